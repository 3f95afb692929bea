"""The console tools end to end on a tiny model: export, check, generate, convert, refusals.
Each tool's output is compared with the same computation done here, in process."""
import pytest
import torch
from safetensors.torch import load_file

from pldr_dist.convert.cli import main as convert_main
from pldr_dist.convert.consolidated import load_consolidated, save_consolidated
from pldr_dist.infer import SamplingConfig, generate
from pldr_dist.infer.cli import export_gcache_main, gcache_check_main, generate_main
from pldr_dist.model import PLDRModel, preset

PROMPTS = [[5, 9, 44, 7], [17, 33, 250]]


def eos_g(model):
    """[L, h, dk, dk]: the G_LM the model computes for the single end-of-sequence token."""
    with torch.no_grad():
        return torch.stack([g[0] for _, _, g in model.deductive_outputs(torch.tensor([[model.cfg.eos_id]]))])


def generated(out: str) -> list:
    """pldr-generate's stdout (`prompt<TAB>ids` per line) -> the generated ids per prompt."""
    rows = [line.split("\t") for line in out.splitlines()]
    assert [list(map(int, prompt.split())) for prompt, _ in rows] == PROMPTS, out
    return [list(map(int, ids.split())) for _, ids in rows]


def expected_check_table(model, art_g) -> list:
    """pldr-gcache-check's per-layer rows, from the fp64 model's G_LM for each prompt."""
    model = model.double()
    with torch.no_grad():
        g = torch.stack([torch.stack([o[2][0] for o in model.deductive_outputs(torch.tensor([p]))]) for p in PROMPTS])
    ref = art_g.double()
    rmse = (g - ref).pow(2).mean((-1, -2)).sqrt()            # [prompt, layer, head]
    logdet, ref_logdet = torch.linalg.slogdet(g).logabsdet, torch.linalg.slogdet(ref).logabsdet
    return [[i, rmse[:, i].mean(), rmse[:, i].max(), ref_logdet[i].mean(), logdet[:, i].mean(), logdet[:, i].std()]
            for i in range(model.cfg.num_layers)]


def test_tools_end_to_end_and_foreign_refusal(tmp_path, capsys):
    torch.manual_seed(0)
    model = PLDRModel(preset("tiny")).eval()
    ckpt = save_consolidated(model, tmp_path / "ckpt")
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(" ".join(map(str, p)) + "\n" for p in PROMPTS))
    art = tmp_path / "g.safetensors"
    export_gcache_main([str(ckpt), str(art), "--source", "eos"])
    art_g = load_file(str(art))["g_lm"]
    assert torch.equal(art_g, eos_g(model))
    capsys.readouterr()
    gcache_check_main([str(ckpt), str(art), "--prompts", str(prompts), "--token-ids", "--plot", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert out.startswith(f"{len(PROMPTS)} prompts; per layer")
    rows = [[float(v) for v in line.split()] for line in out.splitlines()[2:-1]]
    want = expected_check_table(load_consolidated(ckpt), art_g)
    assert len(rows) == len(want)
    for got_row, want_row in zip(rows, want):   # printed with 4 significant digits (RMSE) or 4 decimals
        assert got_row == pytest.approx([float(v) for v in want_row], rel=1e-3, abs=1e-4), (got_row, want_row)
    assert min(row[1] for row in rows) > 1e-3  # the prompts' G_LM is not the end-of-sequence one

    generate_main([str(ckpt), "--prompts", str(prompts), "--token-ids", "--max-new-tokens", "4"])
    with_kvg = capsys.readouterr()
    generate_main([str(ckpt), "--prompts", str(prompts), "--token-ids", "--max-new-tokens", "4", "--gcache", str(art)])
    with_art = capsys.readouterr()
    assert "parameters saved" in with_art.err
    four = SamplingConfig(max_new_tokens=4)
    assert generated(with_kvg.out) == generate(model, PROMPTS, four).tokens
    # the inference-only model from the artifact == the full model with its G-cache pre-filled by the artifact's G
    from_art = generate(model, PROMPTS, four, g_init=list(art_g)).tokens
    assert generated(with_art.out) == from_art != generate(model, PROMPTS, four).tokens

    torch.manual_seed(1)
    other_model = PLDRModel(preset("tiny")).eval()
    other = save_consolidated(other_model, tmp_path / "other")
    with pytest.raises(SystemExit):
        generate_main([str(other), "--prompts", str(prompts), "--token-ids", "--gcache", str(art)])
    assert "computed from another model" in capsys.readouterr().err   # the fingerprint refusal
    generate_main([str(other), "--prompts", str(prompts), "--token-ids", "--gcache", str(art), "--foreign-g",
                   "--max-new-tokens", "2"])
    foreign = capsys.readouterr()
    assert "parameters saved" in foreign.err
    two = SamplingConfig(max_new_tokens=2)
    # the other model's weights with the first model's G, which differs from its own
    want = generate(other_model, PROMPTS, two, g_init=list(art_g)).tokens
    assert generated(foreign.out) == want != generate(other_model, PROMPTS, two, g_init=list(eos_g(other_model))).tokens

    def same_state(a, b):
        a, b = a.state_dict(), b.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    convert_main(["to-hf", str(ckpt), str(tmp_path / "hf")])
    convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")])
    same_state(load_consolidated(tmp_path / "back"), model)
    convert_main(["to-reference", str(ckpt), str(tmp_path / "ref.pt")])
    convert_main(["from-reference", str(tmp_path / "ref.pt"), str(tmp_path / "ref_back"), "--preset", "tiny"])
    same_state(load_consolidated(tmp_path / "ref_back"), model)
