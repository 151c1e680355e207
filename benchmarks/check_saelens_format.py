"""Check the SAELens format against SAELens itself (run in the peers' environment, .venv-peers).

Both directions, on random weights and random raw activations with a mean and a scale far from 1:

* export: each of our SAE architectures (trained units: store scale 0.37) is written with
  `trainer.formats.saelens.export`, loaded with `sae_lens.SAE.load_from_disk`, and SAELens'
  reconstruction of raw activations x is compared with ours (dictionary(s x) / s);
* import: SAEs built and saved by SAELens (`save_model`) for each inference architecture (and
  the options that change the forward: apply_b_dec_to_input, rescale_acts_by_decoder_norm) are
  read with `trainer.formats.saelens.read` and compared the same way, on raw activations and on
  store rows.

    .venv-peers/bin/python -m benchmarks.check_saelens_format [--json out.json]

Prints the largest absolute difference per case (and relative to the largest reconstruction
value) and exits 1 if any relative difference exceeds 1e-5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common.format_checks import SCALE, TOLERANCE, D, M, compare, ours_raw, raw_activations
from trainer.config import DictionarySpec
from trainer.dictionaries import build_dictionary
from trainer.formats import saelens as ours_saelens


def our_sae(arch: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    spec = DictionarySpec(name=arch, architecture=arch, n_latents=M, k=16 if "topk" in arch else None,
                          seed=seed)
    d = build_dictionary(spec, 1, D, [SCALE])
    with torch.no_grad():
        d.W_enc.copy_(torch.randn(1, D, M, generator=g) * 0.2)
        d.b_enc.copy_(torch.randn(M, generator=g) * 0.3)
        d.b_dec.copy_(torch.randn(1, D, generator=g))
        if arch == "batchtopk":
            d.threshold.fill_(0.8)
        if arch == "jumprelu":
            d.log_threshold.copy_((torch.rand(M, generator=g) + 0.2).log())
    return d.eval()


def saelens_built(arch: str, seed: int, **options):
    """An SAE made by SAELens' own classes, its parameters randomized."""
    import sae_lens

    cls, cfg_cls = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
                    "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
                    "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
                    "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig)}[arch]
    cfg = cfg_cls(d_in=D, d_sae=M, **options)
    cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    sae = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = {"W_enc": 0.2, "W_dec": 0.2, "b_dec": 1.0}.get(name, 0.3)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) + 0.2)
    return sae.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    import sae_lens

    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="saelens-check-"))
    x = raw_activations(0)
    print("-- export: ours -> SAELens load_from_disk")
    for arch in ("relu", "topk", "batchtopk", "jumprelu"):
        ours = our_sae(arch, seed=1)
        path = ours_saelens.export(ours, tmp / f"export-{arch}", hook="layer3.resid_post", model_name="tiny")
        sae = sae_lens.SAE.load_from_disk(str(path)).eval()
        with torch.no_grad():
            ref = sae(x)
            fired = float((sae.encode(x) > 0).float().mean())
        rows.append(compare(f"export {arch} -> {sae.cfg.architecture()}", ours_raw(ours, x), ref, fired))

    print("-- import: SAELens save_model -> ours")
    cases = [("standard", {}), ("standard", {"apply_b_dec_to_input": False}), ("jumprelu", {}),
             ("jumprelu", {"apply_b_dec_to_input": False}), ("topk", {"k": 16}),
             ("topk", {"k": 16, "rescale_acts_by_decoder_norm": True}), ("gated", {})]
    for i, (arch, options) in enumerate(cases):
        sae = saelens_built(arch, seed=10 + i, **options)
        path = tmp / f"import-{i}"
        sae.save_model(str(path))
        foreign = ours_saelens.read(path)
        with torch.no_grad():
            ref = sae(x)
            fired = float((sae.encode(x) > 0).float().mean())
            raw = foreign.on_raw()
            got_raw = raw.decode(raw.encode(x[:, None]))[:, 0]
        label = f"import {arch} {json.dumps(options) if options else ''}".strip()
        rows.append(compare(label, got_raw, ref, fired))
        rows.append(compare(f"{label} (store units)", ours_raw(foreign.on_store([SCALE]), x), ref, fired))
    worst = max(r["relative"] for r in rows)
    print(f"largest absolute difference over all cases: {max(r['max_abs_diff'] for r in rows):.3e} "
          f"(relative {worst:.1e}; tolerance {TOLERANCE:.0e})")
    if args.json:
        Path(args.json).write_text(json.dumps({"sae_lens": sae_lens.__version__, "rows": rows}, indent=1))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
