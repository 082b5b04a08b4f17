"""llama.cpp's quantization, as its users ship it: every llama-quantize type, importance matrices (ours
against llama-imatrix's), and pruned widths whose rows K-/i-quants can use (prune --round-to auto)."""
import json
import subprocess

import gguf
import numpy as np
import pytest
import torch

from transact_edge import corpus, importance, llamabuild
from transact_edge.calibration import collect
from transact_edge.checkpoint import save
from transact_edge.cli import main
from transact_edge.exporters import imatrix
from transact_edge.exporters.gguf import GGUFExportOptions, export

from helpers import tiny_model

# rows that fill 256-blocks: hidden 256, attn_output 4 x 64, MLP 1024
QUANTIZABLE = dict(hidden_size=256, head_dim=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024)


@pytest.fixture(scope="module")
def tools():
    """The built llama-quantize and llama-imatrix (built here when the cache has none)."""
    return llamabuild.build("native")


@pytest.fixture
def quantizable_dir(tmp_path, tokenizer):
    path = tmp_path / "wide"
    save(path, tiny_model("llama", **QUANTIZABLE), tokenizer)
    return path


def _fails(capsys, tmp_path, argv: list[str], needle: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left


def test_bad_quantization_input_is_one_line_and_writes_nothing(tmp_path, tiny_llama_dir, tokenizer, capsys):
    out = ["--outfile", str(tmp_path / "m.gguf")]
    export_ = ["export", str(tiny_llama_dir), *out]
    _fails(capsys, tmp_path, [*export_, "--outtype", "IQ2_XXS"], "needs an importance matrix")
    _fails(capsys, tmp_path, [*export_, "--outtype", "f16", "--imatrix", "auto"], "nothing for an importance matrix")
    _fails(capsys, tmp_path, [*export_, "--outtype", "q4_k_m", "--imatrix", str(tmp_path / "none.gguf")],
           "no such file")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x07\x00\x00\x00garbage")
    _fails(capsys, tmp_path, [*export_, "--outtype", "q4_k_m", "--imatrix", str(junk)], "not an importance matrix")
    other = tiny_model("llama", intermediate_size=64)  # another model: ffn_down's rows differ
    sums, tokens = imatrix.collect(other, torch.randint(0, 1000, (2, 32)))
    importance.write(tmp_path / "other.gguf", sums, tokens, 32, ["test"])
    _fails(capsys, tmp_path, [*export_, "--outtype", "IQ3_XXS", "--imatrix", str(tmp_path / "other.gguf")],
           "made for another model")
    _fails(capsys, tmp_path, [*export_, "--outtype", "q4_k_m", "--token-embedding-type", "q9_k"],
           "unknown --token-embedding-type")
    _fails(capsys, tmp_path, [*export_, "--outtype", "q4_k_m", "--token-embedding-type", "q4_k"],
           "do not divide the model's rows of 96")
    _fails(capsys, tmp_path, [*export_, "--outtype", "Q3_X"], "unknown --outtype")


def _llama_tokens(gguf_path, text: str) -> list[int]:
    """The tokens llama-imatrix reads from `text` (common_tokenize with add_special, no special parsing)."""
    from llama_cpp import Llama

    vocab = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return vocab.tokenize(text.encode(), add_bos=True, special=False)
    finally:
        vocab.close()


def test_auto_imatrix_matches_llama_imatrix(tools, tmp_path, tiny_llama_dir):
    """Same tokens, same tensors: each entry's sums agree with llama.cpp's own collector within 1e-3 (relative to
    the entry's largest value); counts are equal; llama-quantize accepts ours."""
    f32 = export(GGUFExportOptions(str(tiny_llama_dir), "f32", tmp_path / "m.gguf"))
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(corpus.default_texts("train")[:40]))
    chunk, chunks = 64, 12
    subprocess.run([str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(tmp_path / "ref.gguf"),
                    "-c", str(chunk), "--chunks", str(chunks), "--no-ppl", "-t", "2"], check=True, capture_output=True)
    ids = torch.tensor(_llama_tokens(f32, text.read_text())[:chunk * chunks]).view(chunks, chunk)
    bos = imatrix.add_bos(f32)
    if bos is not None:
        ids[:, 0] = bos
    from transact_edge.loading import load

    sums, tokens = imatrix.collect(load(str(tiny_llama_dir)).model, ids)
    importance.write(tmp_path / "ours.gguf", sums, tokens, chunk, ["test"])
    ref = {t.name: np.array(t.data, dtype=np.float64).ravel() for t in gguf.GGUFReader(tmp_path / "ref.gguf").tensors}
    ours = {t.name: np.array(t.data, dtype=np.float64).ravel() for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors}
    assert ref.keys() == ours.keys() and len(ours) == 2 * 7 * 3
    for name in ref:
        scale = max(1.0, float(np.abs(ref[name]).max()))
        assert np.abs(ours[name] - ref[name]).max() <= 1e-3 * scale, name
    out = export(GGUFExportOptions(str(tiny_llama_dir), "IQ4_XS", tmp_path / "q.gguf", str(tmp_path / "ours.gguf")))
    assert gguf.GGUFReader(out).get_field("quantize.imatrix.entries_count").contents() == 21


FALLBACK_TYPES = {"Q4_0", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "F16"}  # where llama-quantize puts rows that do not fit


@pytest.mark.parametrize("outtype,imatrix_,base", [
    ("Q4_K_M", None, "Q4_K"), ("Q2_K", None, "Q2_K"), ("IQ4_XS", "auto", "IQ4_XS"), ("iq2_xxs", "auto", "IQ2_XXS"),
])
def test_types_end_to_end_load_in_llama_cpp(tools, tmp_path, quantizable_dir, capsys, caplog, outtype, imatrix_,
                                            base):
    """Rows of 256 and 1024: llama-quantize's own mix of the type, no fallback; llama.cpp loads and runs the
    file; inspect names each tensor's type."""
    from transact_edge.runtimes import open_runtime

    argv = ["export", str(quantizable_dir), "--outtype", outtype, "--outfile", str(tmp_path / "q.gguf")]
    assert main(argv + (["--imatrix", imatrix_] if imatrix_ else [])) == 0
    capsys.readouterr()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    weights = {t for n, t in types.items() if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n}
    assert base in weights and not weights & FALLBACK_TYPES and "stored as" not in caplog.text, types
    session = open_runtime("llama.cpp", tmp_path / "q.gguf", n_ctx=64)
    try:
        assert torch.isfinite(session.logits(torch.tensor([[1, 2, 3, 4]]))).all()
    finally:
        session.close()
    assert main(["inspect", str(tmp_path / "q.gguf"), "--kv-ctx", "0"]) == 0
    shown = capsys.readouterr().out
    assert "tensor types" in shown and types["blk.0.ffn_down.weight"] in shown


def test_fallbacks_are_named_with_their_reason(tools, tmp_path, tiny_llama_dir, caplog):
    """Rows of 96 cannot hold 256-blocks: llama-quantize stores Q4_K's tensors as Q5_0 and export says which."""
    out = export(GGUFExportOptions(str(tiny_llama_dir), "q4_k_m", tmp_path / "q.gguf", token_embedding_type="Q8_0"))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q5_0"
    assert "stored as q5_0, not q4_K (rows of 96 are not a multiple of its blocks of 256)" in caplog.text


def _prune(tmp_path, model_dir, *extra) -> dict:
    out = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
    assert main(["prune", "--model", str(model_dir), "--out", str(out), "--calib-samples", "2", "--seq-len", "64",
                 *extra]) == 0
    return json.loads((out / "transact.json").read_text())


def test_round_to_auto_gives_rows_of_256(tmp_path, quantizable_dir, caplog):
    """Ratios are rounded up to rows of 256 (never cut further than asked); the default is unchanged;
    explicit widths are kept as given."""
    rows = lambda report: report["shots"][-1]["row_lengths"][0]  # noqa: E731
    auto = _prune(tmp_path, quantizable_dir, "--attn-ratio", "0.3", "--mlp-ratio", "0.3", "--round-to", "auto")
    assert rows(auto) == {"attn_output": 256, "ffn_down": 512}  # 0.3 x 4 KV -> 2 (4 heads x 64); 308 -> 512
    default = _prune(tmp_path, quantizable_dir, "--attn-ratio", "0.3", "--mlp-ratio", "0.3")
    assert rows(default) == {"attn_output": 128, "ffn_down": 320}
    explicit = _prune(tmp_path, quantizable_dir, "--kv-heads", "2", "--mlp", "300", "--round-to", "auto")
    assert rows(explicit) == {"attn_output": 256, "ffn_down": 300}
    notes = [r.getMessage() for r in caplog.records if "--round-to auto:" in r.getMessage()]
    assert len(notes) == 1 and "ffn_down 300" in notes[0] and "\n" not in notes[0]  # said once, in one line


def test_round_to_auto_says_when_256_cannot_be_met(tmp_path, tiny_llama_dir, caplog):
    report = _prune(tmp_path, tiny_llama_dir, "--kv-heads", "1", "--mlp-ratio", "0.5", "--round-to", "auto")
    notes = [r.getMessage() for r in caplog.records if "--round-to auto:" in r.getMessage()]
    assert len(notes) == 1 and "attn_output 48, ffn_down 64" in notes[0] and "\n" not in notes[0]
    assert report["shots"][-1]["row_lengths"][0] == {"attn_output": 48, "ffn_down": 64}


def test_prune_ranks_by_an_imatrix_as_by_its_own_pass(tools, tmp_path, quantizable_dir, tokenizer, capsys):
    """An importance matrix holding the calibration pass's sums gives prune the same cut without a pass of its
    own; the output carries that matrix cut to the kept columns, which llama-quantize takes for the pruned file."""
    from transact_edge.loading import load

    widths = ["--heads", "4", "--kv-heads", "2", "--mlp", "512", "--calib-samples", "4", "--seq-len", "64"]
    model = load(str(quantizable_dir)).model
    calib = corpus.windows(corpus.stream(tokenizer, corpus.DEFAULT, "train"), 64, 4)
    stats = collect(model, calib)
    sums, tokens = imatrix.collect(model, calib)  # every entry llama-quantize wants; o/down are the pass's sums
    sums |= {f"blk.{il}.{w}.weight": s for il in range(len(stats.mha))
             for w, s in (("attn_output", stats.mha[il]), ("ffn_down", stats.mlp[il]))}
    importance.write(tmp_path / "dense.gguf", sums, tokens, 64, ["test"])
    own, ranked = tmp_path / "own", tmp_path / "ranked"
    assert main(["prune", "--model", str(quantizable_dir), *widths, "--out", str(own)]) == 0
    assert main(["prune", "--model", str(quantizable_dir), *widths, "--imatrix", str(tmp_path / "dense.gguf"),
                 "--out", str(ranked)]) == 0
    plans = [json.loads((d / "transact.json").read_text())["plan"] for d in (own, ranked)]
    assert plans[0]["layers"] == plans[1]["layers"] and plans[0]["heads"] == plans[1]["heads"]
    assert plans[0]["channels"] == plans[1]["channels"]
    cut = importance.read_sums(ranked / "imatrix.gguf")
    kept = plans[1]["channels"][0]
    np.testing.assert_allclose(cut["blk.0.ffn_down.weight"], stats.mlp[0].numpy()[kept], rtol=1e-6)
    out = tmp_path / "ranked-q4_k_m.gguf"
    assert main(["export", str(ranked), "--outtype", "q4_k_m", "--imatrix", str(ranked / "imatrix.gguf"),
                 "--outfile", str(out)]) == 0 and out.is_file()
    capsys.readouterr()
    _fails(capsys, tmp_path, ["prune", "--model", str(quantizable_dir), *widths, "--shots", "2", "--imatrix",
                              str(tmp_path / "dense.gguf"), "--out", str(tmp_path / "x")], "one TransAct cut")
