"""Insert a chapter into the arc: shift the numbers of the chapters from a place on, everywhere they are written.

    python tools/renumber_chapters.py 8            # chapters 08, 09, … become 09, 10, …
    python tools/renumber_chapters.py 8 --dry-run  # list what would change

A new chapter goes in at its place in the arc (docs/ and ../shared/WORKBOOK_GUIDE.md): the later files move up by
one in one commit, with every reference to them. Moved: ``notebooks/NN_*.ipynb`` and their twins in
``notebooks/exercises/`` and ``notebooks/solutions/``. Rewritten in every tracked text file (notebooks, Markdown,
Python): file names ``NN_slug``, "notebook NN" / "notebooks NN and MM" / "chapters NN–MM", a notebook's own
heading ``# NN ·``, "exercise NN.k", glossary links ``[NN](…)`` and a glossary entry's list
``**term** (05, 08)``. Numbers below the place and anything else are left alone; what the script cannot tell apart
(a range such as ``00–10`` written without the word "notebook", a schedule's rows) it prints or leaves for a
person to check. Measured results keep the names they were measured under until they are measured again.
"""
from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("notebooks", "notebooks/exercises", "notebooks/solutions")
TEXT = (".py", ".md", ".ipynb", ".json", ".txt", ".cfg", ".toml", ".yml")
SKIP = ("benchmarks/results/", "tools/renumber_chapters.py")   # measured results keep their names; its own examples


def chapters() -> dict[int, str]:
    """Chapter number → slug, from notebooks/NN_slug.ipynb."""
    out = {}
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        out[int(path.name[:2])] = path.stem[3:]
    return out


def mapping(place: int) -> dict[int, int]:
    return {n: n + 1 for n in chapters() if n >= place}


def rewrite(text: str, shift: dict[int, int], slugs: set[str]) -> str:
    """``text`` with every chapter number in ``shift`` written as its new number, where the context says it is
    a chapter."""
    def new(number: str) -> str:
        return f"{shift.get(int(number), int(number)):02d}"

    slug = "|".join(sorted(map(re.escape, slugs), key=len, reverse=True))
    text = re.sub(rf"\b(\d\d)_({slug})\b", lambda m: f"{new(m[1])}_{m[2]}", text)
    numbers = r"\d\d(?:(?:\s*(?:,|and|&|or|to|…|–|-)\s*)\d\d)*"
    text = re.sub(rf"(?i)\b(notebooks?|chapters?)(\s+)({numbers})\b",
                  lambda m: m[1] + m[2] + re.sub(r"\d\d", lambda n: new(n[0]), m[3]), text)
    text = re.sub(r"\[(\d\d)\](\((?:\.\./)*notebooks/)", lambda m: f"[{new(m[1])}]{m[2]}", text)
    text = re.sub(r"(?i)\b(exercises? )(\d\d)\.(\d)\b", lambda m: f"{m[1]}{new(m[2])}.{m[3]}", text)   # "exercise 08.2"
    glossary = r"(\*\*[^*\n]+\*\* \()(\d\d(?:, \d\d)*)(\))"           # docs/glossary.md: **term** (05, 08)
    return re.sub(glossary, lambda m: m[1] + re.sub(r"\d\d", lambda n: new(n[0]), m[2]) + m[3], text)


def heading(text: str, number: int) -> str:
    """A notebook's own title ``# NN · …`` set to its (new) number."""
    return re.sub(r'(^\s*"# )\d\d( ·)', lambda m: f"{m[1]}{number:02d}{m[2]}", text, count=1, flags=re.M)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("place", type=int, help="the number the new chapter takes; chapters from it move up")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.place not in chapters():
        raise SystemExit(f"place = {args.place} is not allowed; allowed: an existing chapter number "
                         f"({', '.join(f'{n:02d}' for n in chapters())})")
    shift, slugs = mapping(args.place), set(chapters().values())
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        path = ROOT / name
        if not name.endswith(TEXT) or name.startswith(SKIP) or not path.is_file():
            continue
        old = path.read_text(encoding="utf-8")
        text = rewrite(old, shift, slugs)
        if text != old:
            print(f"rewrite {name}")
            if not args.dry_run:
                path.write_text(text, encoding="utf-8")
    for folder in FOLDERS:
        for n in sorted(shift, reverse=True):                     # highest first: no name is taken twice
            [src] = (ROOT / folder).glob(f"{n:02d}_*.ipynb")
            dst = src.with_name(f"{shift[n]:02d}_{src.name[3:]}")
            print(f"move {src.relative_to(ROOT)} -> {dst.relative_to(ROOT)}")
            if not args.dry_run:
                subprocess.run(["git", "mv", str(src), str(dst)], cwd=ROOT, check=True)
                dst.write_text(heading(dst.read_text(encoding="utf-8"), shift[n]), encoding="utf-8")
    ranges = re.compile(r"\b\d\d\s*(?:–|-|…|to)\s*\d\d\b")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        if name.endswith((".md", ".ipynb", ".py")) and not name.startswith(SKIP) and (ROOT / name).is_file():
            for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
                if ranges.search(line) and re.search(r"(?i)chapter|notebook|course", line):
                    print(f"check by hand: {name}: {line.strip()[:120]}")


if __name__ == "__main__":
    main()
