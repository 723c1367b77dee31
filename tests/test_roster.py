"""The server operator's roster: which registered key is which hospital; broken or doubled entries are refused by name."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from server.roster import Registered, add_to_roster, key_digest, load_roster


def test_a_registered_hospital_is_found_by_its_node_and_no_name_node_or_key_is_registered_twice(tmp_path):
    roster = tmp_path / "roster.yaml"
    key = tmp_path / "st-marys.pub"
    key.write_text("ecdsa-sha2-nistp384 AAAAE2VjZHNh st-marys@hospital\n")
    same = tmp_path / "same.pub"
    same.write_text("ecdsa-sha2-nistp384 AAAAE2VjZHNh another comment")
    assert key_digest(same) == key_digest(key)  # the key counts, not its comment
    add_to_roster(roster, Registered("st-marys", 4321, key_digest(key), 1200))
    add_to_roster(roster, Registered("general", 8765, "other-key"))
    assert load_roster(roster) == {4321: Registered("st-marys", 4321, key_digest(key), 1200), 8765: Registered("general", 8765, "other-key")}
    for doubled in (Registered("st-marys", 1, "k1"), Registered("x", 4321, "k2"), Registered("y", 2, key_digest(key))):
        with pytest.raises(ConfigError, match="is registered already"):
            add_to_roster(roster, doubled)
    assert len(load_roster(roster)) == 2  # nothing was written by a refused registration


@pytest.mark.parametrize("text, error", [
    ("- name: a\n  node-id: x\n", "entry 1: expected name (text) and node-id (a number)"),
    ("- {name: a, node-id: 1}\n- {name: a, node-id: 2}\n", "'a' (node 2) appears twice"),
    ("- {name: a, node-id: 1, images: -3}\n", "entry 1 (a): images = -3: expected a count"),
    ("name: a\n", "expected a list of hospitals"),
    ("- [unclosed\n", "not valid YAML"),
])  # fmt: skip
def test_a_broken_roster_is_refused_naming_the_file_and_entry(tmp_path, text, error):
    roster = tmp_path / "roster.yaml"
    roster.write_text(text)
    with pytest.raises(ConfigError, match=str(roster)) as caught:
        load_roster(roster)
    assert error in str(caught.value)
