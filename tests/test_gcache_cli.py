"""The console tools end to end on a tiny model: export, check, generate, convert, refusals."""
import pytest
import torch

from pldr_dist.convert.cli import main as convert_main
from pldr_dist.convert.consolidated import load_consolidated, save_consolidated
from pldr_dist.infer.cli import export_gcache_main, gcache_check_main, generate_main
from pldr_dist.model import PLDRModel, preset


def test_tools_end_to_end_and_foreign_refusal(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_consolidated(PLDRModel(preset("tiny")), tmp_path / "ckpt")
    prompts = tmp_path / "p.txt"
    prompts.write_text("5 9 44 7\n17 33 250\n")
    art = tmp_path / "g.safetensors"
    export_gcache_main([str(ckpt), str(art), "--source", "eos"])
    gcache_check_main([str(ckpt), str(art), "--prompts", str(prompts), "--token-ids", "--plot", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 0
    capsys.readouterr()
    generate_main([str(ckpt), "--prompts", str(prompts), "--token-ids", "--max-new-tokens", "4"])
    with_kvg = capsys.readouterr()
    generate_main([str(ckpt), "--prompts", str(prompts), "--token-ids", "--max-new-tokens", "4", "--gcache", str(art)])
    with_art = capsys.readouterr()
    assert "parameters saved" in with_art.err
    assert len(with_art.out.splitlines()) == 2 and len(with_kvg.out.splitlines()) == 2

    torch.manual_seed(1)
    other = save_consolidated(PLDRModel(preset("tiny")), tmp_path / "other")
    with pytest.raises(SystemExit):
        generate_main([str(other), "--prompts", str(prompts), "--token-ids", "--gcache", str(art)])
    assert "FingerprintError" in capsys.readouterr().err
    generate_main([str(other), "--prompts", str(prompts), "--token-ids", "--gcache", str(art), "--foreign-g",
                   "--max-new-tokens", "2"])

    convert_main(["to-hf", str(ckpt), str(tmp_path / "hf")])
    convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")])
    assert all(torch.equal(a, b) for a, b in zip(load_consolidated(ckpt).state_dict().values(),
                                                 load_consolidated(tmp_path / "back").state_dict().values()))
    convert_main(["to-reference", str(ckpt), str(tmp_path / "ref.pt")])
    convert_main(["from-reference", str(tmp_path / "ref.pt"), str(tmp_path / "ref_back"), "--preset", "tiny"])
    assert torch.equal(load_consolidated(tmp_path / "ref_back").head.weight, load_consolidated(ckpt).head.weight)
