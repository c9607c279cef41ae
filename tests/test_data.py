"""Tokenizer, deterministic batches, and the errors of load_text / load_corpus."""
import pytest
import torch

from moelab.data import CharTokenizer, build, load_corpus, load_text, split_at_line


def test_tokenizer_round_trip_and_unknown_character():
    tok = CharTokenizer.from_text("hello, 世界")
    assert tok.vocab_size == 8 and tok.chars == sorted(set("hello, 世界"))
    assert tok.decode(tok.encode("世界, hello")) == "世界, hello"
    with pytest.raises(ValueError, match=r"character 'z' at position 2 is not in the tokenizer's vocabulary of 8"):
        tok.encode("hez")


@pytest.fixture(scope="module")
def data():
    return build({"a": "abcdefgh\n" * 50, "b": "0123456789\n" * 50}, val_fraction=0.2)


def test_split_ranges_cover_each_domain(data):
    assert data.domains == ("a", "b")
    for split in ("train", "val"):
        (a0, a1), (b0, b1) = data.ranges[split]["a"], data.ranges[split]["b"]
        assert a0 == 0 and a1 == b0 and b1 == len(data.tokens[split])
    assert data.tokenizer.decode(data.tokens["val"][slice(*data.ranges["val"]["b"])]).startswith("0123")


def test_batches_are_deterministic_and_shifted(data):
    x, y = data.batch("train", 4, 8, seed=7)
    x2, y2 = data.batch("train", 4, 8, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (4, 8)
    assert not torch.equal(x, data.batch("train", 4, 8, seed=8)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_domain_batches_stay_inside_the_domain(data):
    digits = set(data.tokenizer.encode("0123456789\n").tolist())
    for seed in range(20):
        x, y = data.batch("val", 8, 10, seed=seed, domain="b")
        assert set(x.flatten().tolist()) <= digits and set(y.flatten().tolist()) <= digits


def test_batch_errors(data):
    with pytest.raises(ValueError, match="split = 'test' is not allowed"):
        data.batch("test", 1, 4, 0)
    with pytest.raises(ValueError, match="domain = 'c' is not allowed; allowed: None, a, b"):
        data.batch("train", 1, 4, 0, domain="c")
    with pytest.raises(ValueError, match=r"block_size = 500 is not allowed: the val split of domain 'a' has only"):
        data.batch("val", 1, 500, 0, domain="a")


def test_split_at_line():
    train, val = split_at_line("aaaa\nbbbb\ncccc\ndddd\n", 0.3)
    assert train + val == "aaaa\nbbbb\ncccc\ndddd\n" and train.endswith("\n") and val == "dddd\n"
    with pytest.raises(ValueError, match="val_fraction = 1.5 is not allowed"):
        split_at_line("abc", 1.5)


def test_load_text_trains_on_any_utf8_file(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("ünïcode line\n" * 40, encoding="utf-8")
    data = load_text(path)
    assert data.domains == ("poem",) and "ü" in data.tokenizer.chars
    assert data.batch("train", 2, 16, 0)[0].shape == (2, 16)


def test_load_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at .*missing.txt"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="is not a file"):
        load_text(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text: byte 0xe9 at offset 3"):
        load_text(tmp_path / "latin1.txt")


def test_load_corpus_names_missing_files(tmp_path):
    (tmp_path / "arithmetic.txt").write_text("1+1=2\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="english, code, facts, chinese not found.*python -m moelab.corpus"):
        load_corpus(tmp_path)


def test_course_corpus_loads_with_five_domains():
    data = load_corpus()
    assert data.domains == ("arithmetic", "english", "code", "facts", "chinese")
    sizes = [b - a for a, b in data.ranges["val"].values()]
    assert all(15_000 < s < 25_000 for s in sizes)  # about 10 % of 200,000 characters each


def test_a_text_too_short_to_hold_out_validation_is_refused(tmp_path):
    (tmp_path / "one_line.txt").write_text("a single line with no break at the end", encoding="utf-8")
    with pytest.raises(ValueError, match=r"text 'one_line' \(38 characters\) has no line break in its last 10%"):
        load_text(tmp_path / "one_line.txt")


def test_balanced_batches_cycle_through_the_domains(data):
    letters = set(data.tokenizer.encode("abcdefgh\n").tolist())
    x, _ = data.batch("train", 6, 5, seed=0, balanced=True)
    from_a = [set(row.tolist()) <= letters for row in x]
    assert from_a == [True, False, True, False, True, False]
