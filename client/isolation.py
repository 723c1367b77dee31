"""Running the code the server ships (the per-message ClientApp processes) as a user that cannot read the hospital's
images: a dedicated unprivileged account the hospital creates, through util-linux's setpriv, with checks that say in
one line what to fix before anything starts."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.deployment import CREATE_USER, closed_folders, run_as
from common.tls import DeploymentError



@dataclass(frozen=True)
class AppUser:
    """The account the ClientApps run as."""

    name: str
    uid: int
    gid: int

    def run_as(self) -> list[str]:
        """The command prefix that runs a command as this user, its privileges dropped for good."""
        return run_as(self.uid, self.gid)


def app_user(name: str) -> AppUser:
    """The ClientApp account, or DeploymentError saying how to create it; this process must be root to switch to it."""
    if os.geteuid() != 0:
        raise DeploymentError(
            f"running the ClientApps as user {name!r} needs this command to run as root (it switches to that user for them); "
            "run it as root, or --unisolated for a local rehearsal (the server's code then runs with access to the images)"
        )
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise DeploymentError(f"no user {name!r} for the ClientApps: create it ({CREATE_USER.format(name=name)}) or name another with --clientapp-user") from None
    if entry.pw_uid == 0:
        raise DeploymentError(f"user {name!r} is root: the ClientApps must run as an unprivileged user")
    return AppUser(name, entry.pw_uid, entry.pw_gid)


def _as_user(user: AppUser, code: str) -> subprocess.CompletedProcess:
    """Run a line of Python as the user, with this installation's interpreter."""
    return subprocess.run([*user.run_as(), sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={"PATH": os.environ.get("PATH", "")})


def check_isolation(user: AppUser, data_root: Path) -> None:
    """DeploymentError unless the user can run this installation's Python and Flower, and cannot read the images."""
    ran = _as_user(user, "import flwr.clientapp")
    if ran.returncode != 0:
        why = (ran.stderr.strip().splitlines() or ["no reason given"])[-1]
        closed = " ".join(map(str, closed_folders()))
        raise DeploymentError(
            f"user {user.name!r} cannot run this installation ({sys.executable}: {why}); install fedimaging where that user can "
            f"read it (e.g. /opt/fedimaging with a system Python)" + (f", or let it through the folders on the way (chmod o+x {closed})" if closed else "")
        )
    looked = _as_user(user, f"import os; os.listdir({str(data_root)!r})")
    if looked.returncode == 0:
        raise DeploymentError(
            f"user {user.name!r} can read the images in {data_root}: make them unreadable to it (e.g. chown -R <the hospital's "
            f"user> {data_root} && chmod -R o-rwx {data_root}), so that code from the server cannot open them"
        )


def private_home(user: AppUser | None, under: str | None) -> Path:
    """A new folder only the ClientApp user may use (its FLWR_HOME: Flower unpacks each run's app there)."""
    folder = Path(tempfile.mkdtemp(prefix="fedimaging-clientapp-", dir=under))
    if user is not None:
        os.chown(folder, user.uid, user.gid)
    folder.chmod(0o700)
    return folder
