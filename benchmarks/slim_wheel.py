"""Rewrite a wheel without the image files that none of its text files names.

    python benchmarks/slim_wheel.py .whl/metaworld-3.1.1-py3-none-any.whl

Meta-World's wheel is 35 MiB, two thirds of it PNG textures that no model file of the
package loads; state-based training never renders. An image is kept when its file name
(e.g. ``wood1.png``) appears in any ``.xml``/``.py``/``.json``/``.txt`` file of the wheel
(model files name textures by relative paths that MuJoCo resolves against the main model
file, so a name match is the safe test). Dropped files leave ``RECORD`` too; nothing else
changes. Prints the size before and after.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import zipfile
from pathlib import PurePosixPath

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEXT_SUFFIXES = (".xml", ".py", ".json", ".txt")


def unreferenced_images(archive: zipfile.ZipFile) -> set[str]:
    """Archive names of images whose file name no text file of the archive mentions."""
    names = archive.namelist()
    text = "\n".join(
        archive.read(name).decode("utf-8", errors="ignore") for name in names if name.lower().endswith(TEXT_SUFFIXES)
    )
    return {name for name in names if name.lower().endswith(IMAGE_SUFFIXES) and PurePosixPath(name).name not in text}


def slim_wheel(path: str) -> tuple[int, int, int]:
    """Rewrite the wheel at ``path`` in place; returns ``(bytes before, bytes after, files dropped)``."""
    before = os.path.getsize(path)
    with zipfile.ZipFile(path) as archive:
        dropped = unreferenced_images(archive)
        handle, temporary = tempfile.mkstemp(suffix=".whl", dir=os.path.dirname(os.path.abspath(path)))
        os.close(handle)
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as slim:
            for info in archive.infolist():
                if info.filename in dropped:
                    continue
                data = archive.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode()
                slim.writestr(info, data)
    os.chmod(temporary, os.stat(path).st_mode & 0o777)
    os.replace(temporary, path)
    return before, os.path.getsize(path), len(dropped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", nargs="+")
    for path in parser.parse_args().wheels:
        before, after, dropped = slim_wheel(path)
        print(f"{os.path.basename(path)}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({dropped} unused images dropped)")


if __name__ == "__main__":
    main()
