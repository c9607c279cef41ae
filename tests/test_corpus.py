"""The committed corpus is exactly what its generator produces, and each domain has the promised structure."""
import re
import subprocess
import sys
import unicodedata

import pytest

from moelab import corpus


def test_regenerated_corpus_matches_committed_files(tmp_path):
    out = tmp_path / "corpus"
    subprocess.run([sys.executable, "-m", "moelab.corpus", "--out", str(out)], check=True, capture_output=True)
    committed = (corpus.CORPUS_DIR / "SHA256SUMS").read_text(encoding="utf-8")
    assert (out / "SHA256SUMS").read_text(encoding="utf-8") == committed
    for line in committed.splitlines():
        digest, name = line.split()
        assert corpus.sha256(corpus.CORPUS_DIR / name) == digest, f"src/moelab/corpus/{name} was edited by hand"


def test_seed_changes_the_text():
    assert corpus.generate_domain("english", 2000, seed=0) != corpus.generate_domain("english", 2000, seed=1)
    assert corpus.generate_domain("english", 2000, seed=0) == corpus.generate_domain("english", 2000, seed=0)


def test_unknown_domain():
    with pytest.raises(ValueError, match="domain = 'poetry' is not allowed; allowed: arithmetic, english"):
        corpus.generate_domain("poetry")


def lines(domain):
    return (corpus.CORPUS_DIR / f"{domain}.txt").read_text(encoding="utf-8").splitlines()


def test_arithmetic_is_correct():
    for line in lines("arithmetic"):
        a, op, b, result = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)", line).groups()
        assert eval(f"{a}{op}{b}") == int(result), line


def test_english_verbs_agree_with_their_subject():
    singular = {s for s, _ in corpus._TRANSITIVE + corpus._INTRANSITIVE}
    plural = {p for _, p in corpus._TRANSITIVE + corpus._INTRANSITIVE}
    plural_nouns = {p for _, p in corpus._NOUNS}
    for line in lines("english")[:2000]:
        for sentence in line.rstrip(".").split(". "):
            words = sentence.lower().split()
            verb = next(w for w in words if w in singular | plural)
            subject_noun = words[words.index(verb) - 1]
            assert (verb in plural) == (subject_noun in plural_nouns), sentence


def test_facts_never_contradict_each_other():
    seen = {}
    for line in lines("facts"):
        key, value = line.split(" = ")
        assert seen.setdefault(key, value) == value, f"{key} has two values"
    assert len(seen) > 900  # most of the 256 × 4 facts appear, each several times


def test_chinese_domain_is_cjk():
    text = "".join(lines("chinese"))
    assert all(unicodedata.name(c).startswith(("CJK", "FULLWIDTH", "IDEOGRAPHIC")) for c in text)


def test_code_domain_is_python_that_compiles():
    source = (corpus.CORPUS_DIR / "code.txt").read_text(encoding="utf-8")
    compile(source, "code.txt", "exec")
