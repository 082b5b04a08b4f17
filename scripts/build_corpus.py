"""Build the default corpus shipped in transact_edge/data from the gensim 4.4.0 wheel's Wikipedia excerpt.

Run once by maintainers (the output is committed):
    pip download --no-deps gensim==4.4.0 -d /tmp/g && pip install mwparserfromhell
    python scripts/build_corpus.py /tmp/g/gensim-4.4.0-*.whl

Pages are cleaned with mwparserfromhell's strip_code(), then split by page: every 10th page
(by order in the dump) is held out for evaluation, the rest is calibration/training text.
"""
import bz2
import gzip
import json
import re
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import mwparserfromhell

MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
OUT = Path(__file__).resolve().parents[1] / "transact_edge" / "data"
HELD_OUT_EVERY = 10


def pages(xml_bytes: bytes):
    """Yield (title, cleaned text) of every article page with real text."""
    for _, elem in ET.iterparse(__import__("io").BytesIO(xml_bytes)):
        if not elem.tag.endswith("}page"):
            continue
        ns = elem.tag[: -len("page")]
        title = elem.findtext(f"{ns}title") or ""
        raw = elem.findtext(f"{ns}revision/{ns}text") or ""
        elem.clear()
        if raw.lstrip().lower().startswith("#redirect") or ":" in title:
            continue
        text = mwparserfromhell.parse(raw).strip_code(normalize=True, collapse=True)
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if len(text) > 200:
            yield title, text


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        xml = bz2.decompress(zf.read(MEMBER))
    rows = list(pages(xml))
    split = {"train": [], "eval": []}
    for i, (title, text) in enumerate(rows):
        split["eval" if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"].append(
            {"title": title, "text": text})
    for name, docs in split.items():
        with gzip.open(OUT / f"wiki_{name}.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        print(name, len(docs), "pages", sum(len(d["text"]) for d in docs), "chars")


if __name__ == "__main__":
    main(sys.argv[1])
