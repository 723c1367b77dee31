"""Site files as hospital IT staff write them: YAML's unquoted yes/no, images of other shapes, the source of each
held-out image, and a folder this user may not read."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import parse_run_config
from common.data_check import check_site
from common.errors import ConfigError
from common.site_data import heldout_from_site, load_site
from common.site_file import load_site_config

PROJECT = Path(__file__).resolve().parent.parent


def _png(path: Path, width: int, height: int, value: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((height, width), value, np.uint8)
    pixels[height // 3 : height // 2, width // 3 : width // 2] = 255
    Image.fromarray(pixels, "L").save(path)
    return path


@pytest.mark.parametrize(
    "fragment, message",
    [
        ("labels: {tumour: yes}\nnegative-folders: [healthy]\n", "'labels.tumour': got the YAML boolean True (YAML reads unquoted yes/no, on/off and true/false as booleans): quote the name, e.g. 'yes'"),
        ("labels: {tumour: tumour}\nnegative-folders: [no]\n", "'negative-folders': got the YAML boolean False .* quote the name, e.g. 'no'"),
        ("labels: {on: tumour}\nnegative-folders: [healthy]\n", "'labels': label True: got the YAML boolean True"),
        ("labels: {tumour: tumour}\nnegative-folders: [1.5]\n", "'negative-folders': got the YAML number 1.5: quote the name, e.g. '1.5'"),
        ("name: yes\n", "'name': got the YAML boolean True"),
    ],
)
def test_a_yaml_boolean_or_number_where_a_name_belongs_says_to_quote_it(tmp_path, fragment, message):
    text = "name: a\ndata-root: .\nlayout: folders\n"
    text = text.replace("name: a\n", "") + fragment if fragment.startswith("name") else text + fragment
    (tmp_path / "site.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message) if "(" in message and ".*" not in message else message):
        load_site_config(tmp_path / "site.yaml")


def test_quoted_and_numbered_folder_names_are_names(tmp_path):
    for folder in ("yes", "no", "0"):
        _png(tmp_path / "data" / folder / "a.png", 16, 16)
    (tmp_path / "site.yaml").write_text("name: a\ndata-root: data\nlayout: folders\nlabels: {tumour: 'yes'}\nnegative-folders: ['no', 0]\n")
    site = load_site_config(tmp_path / "site.yaml")
    assert site.labels == {"tumour": "yes"} and site.negative_folders == ("no", "0")


def _oblong_site(tmp_path: Path, fit: str = "") -> Path:
    """A site of wide images (40x20) with a bright square left of centre, plus square ones."""
    for i in range(6):
        _png(tmp_path / "data" / "tumour" / f"w{i}.png", 40, 20, 100 + i)
        _png(tmp_path / "data" / "healthy" / f"s{i}.png", 20, 20, 60 + i)
    (tmp_path / "site.yaml").write_text(
        "name: a\ndata-root: data\nlayout: folders\nlabels: {tumour: tumour}\nnegative-folders: [healthy]\n" + (f"image-fit: {fit}\n" if fit else "")
    )
    return tmp_path / "site.yaml"


@pytest.mark.parametrize("fit, words", [("pad", "padded with black to a square"), ("crop", "cut to their central square"), ("stretch", "stretched to a square")])
def test_images_of_another_shape_are_fitted_as_the_site_or_run_says_and_the_check_says_how(tmp_path, fit, words):
    cfg = parse_run_config({"labels": "tumour", "image-size": 16, "image-fit": "stretch" if fit != "stretch" else "pad"})
    site = load_site_config(_oblong_site(tmp_path, fit))  # the site's choice wins over the run's
    report = check_site(site, cfg)
    assert f"Not square: 6 image(s); they will be {words} (image-fit: {fit})" in report.lines
    held = heldout_from_site(site, cfg)
    wide = held.images[held.labels[:, 0] == 1][0, ..., 0]  # (16, 16)
    if fit == "pad":
        assert np.allclose(wide[:3], 0) and np.allclose(wide[-3:], 0) and wide[6:10].mean() > 0.3  # black bars above and below
    elif fit == "crop":
        assert wide.min() > 0.3  # the centre only: no bars, the image's own grey everywhere
    else:
        assert wide.min() > 0.3 and not np.allclose(wide[:, :8], wide[:, 8:])
    data = load_site(site, cfg)
    assert data.fit == fit


def test_a_run_setting_chooses_the_fit_where_the_site_does_not(tmp_path):
    site = load_site_config(_oblong_site(tmp_path))
    assert load_site(site, parse_run_config({"labels": "tumour", "image-size": 16, "image-fit": "crop"})).fit == "crop"
    with pytest.raises(ConfigError, match="'image-fit': 'squash': expected one of pad, crop, stretch"):
        (tmp_path / "site.yaml").write_text((tmp_path / "site.yaml").read_text() + "image-fit: squash\n")
        load_site_config(tmp_path / "site.yaml")


def test_a_heldout_site_can_name_each_images_source_by_folder_or_column(tmp_path):
    for hospital in ("st-marys", "general"):
        for i in range(3):
            _png(tmp_path / "data" / "tumour" / hospital / f"{i}.png", 16, 16, 90 + i)
            _png(tmp_path / "data" / "healthy" / hospital / f"{i}.png", 16, 16, 40 + i)
    (tmp_path / "site.yaml").write_text("name: h\ndata-root: data\nlayout: folders\nlabels: {tumour: tumour}\nnegative-folders: [healthy]\nsource-subfolders: true\n")
    cfg = parse_run_config({"labels": "tumour", "image-size": 16})
    held = heldout_from_site(load_site_config(tmp_path / "site.yaml"), cfg)
    assert sorted(set(held.source)) == ["general", "st-marys"] and (held.source == "general").sum() == 6
    _png(tmp_path / "data" / "tumour" / "loose.png", 16, 16)
    with pytest.raises(Exception, match="loose.png: not inside a source sub-folder"):
        heldout_from_site(load_site_config(tmp_path / "site.yaml"), cfg)
    (tmp_path / "m.csv").write_text("file,tumour,hospital\n" + "".join(f"data/tumour/st-marys/{i}.png,1,st-marys\ndata/healthy/general/{i}.png,0,general\n" for i in range(3)))
    (tmp_path / "m.yaml").write_text("name: m\ndata-root: .\nlayout: manifest\nmanifest: m.csv\nimage-column: file\nlabels: {tumour: tumour}\nsource-column: hospital\n")
    held = heldout_from_site(load_site_config(tmp_path / "m.yaml"), cfg)
    assert held.source.tolist() == ["st-marys", "general"] * 3
    (tmp_path / "bad.yaml").write_text("name: m\ndata-root: .\nlayout: folders\nlabels: {tumour: tumour}\nsource-column: hospital\n")
    with pytest.raises(ConfigError, match="'source-column': only the manifest layout has columns"):
        load_site_config(tmp_path / "bad.yaml")


def _as_unprivileged(work) -> str:
    """What work() returns, or what it raises in one line, run as a user file modes apply to: this one, or (root ignores
    file modes, and CI runs as root) the user 'nobody' in a forked child that has imported what it needs already."""
    if os.geteuid() != 0:
        try:
            return str(work())
        except Exception as exc:  # noqa: BLE001 - the message is the result
            return f"{type(exc).__name__}: {exc}"
    import pwd

    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read)
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            said = str(work())
        except Exception as exc:  # noqa: BLE001
            said = f"{type(exc).__name__}: {exc}"
        os.write(write, said.encode())
        os._exit(0)
    os.close(write)
    said = b""
    while chunk := os.read(read, 65536):
        said += chunk
    os.waitpid(child, 0)
    return said.decode()


def test_a_folder_this_user_cannot_read_is_said_to_be_unreadable_not_empty():
    """A class folder, and a data root, that this user may not list: each named with that reason, not 'empty folder'."""
    from common.site_data import read_site

    root = Path(tempfile.mkdtemp(prefix="fedimaging-perm-"))
    try:
        for folder in ("tumour", "healthy"):
            _png(root / "data" / folder / "a.png", 16, 16)
            _png(root / "data" / folder / "b.png", 16, 16, 99)
        (root / "site.yaml").write_text(f"name: a\ndata-root: data\nlayout: folders\nlabels: {{tumour: tumour}}\nnegative-folders: [healthy]\nreport-dir: {root / 'reports'}\n")
        for path in [root, *root.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        (root / "reports").mkdir()
        os.chmod(root / "reports", 0o777)  # the scan cache is written there
        cfg = parse_run_config({"labels": "tumour", "image-size": 16})
        site = load_site_config(root / "site.yaml")
        os.chmod(root / "data" / "tumour", 0o300)  # the class folder: this user may not list it
        said = _as_unprivileged(lambda: read_site(site, cfg))
        assert said == f"DataError: {root / 'data' / 'tumour'}: permission denied: this user cannot list the folder"
        os.chmod(root / "data" / "tumour", 0o755)
        os.chmod(root / "data", 0o300)  # now the data root itself
        assert _as_unprivileged(lambda: read_site(site, cfg)) == f"DataError: {root / 'data'}: permission denied: this user cannot list the data root"
        os.chmod(root / "data", 0o755)
        os.chmod(root / "data" / "healthy" / "b.png", 0o000)  # and one file it may not read
        reason = _as_unprivileged(lambda: read_site(site, cfg)[1].set_index("path").loc[str(root / "data" / "healthy" / "b.png"), "reason"])
        assert reason == "permission denied: this user cannot read the file"
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(root)], check=False)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
