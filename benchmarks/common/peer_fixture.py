"""The shared subject of the peer comparisons: a tiny Llama trained briefly on the generated corpus,
an experiment config over it, and the same tokens as a Hugging Face dataset for the peers.

Cross entropy of a random-weight model is meaningless (about ln(vocab), and ablating a layer can
lower it), so the model is trained for a few hundred deterministic steps first: enough for the
splice metrics to mean something and for the activations to have the structure of a real residual
stream. Everything is built offline under a work folder and reused by the benchmarks that follow
(the folder name holds a hash of the recipe, so a changed recipe builds a new model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_WORK = Path(os.environ.get("MDIFF_BENCH_WORK", "/tmp/mdiff-bench-peers"))


@dataclass(frozen=True)
class LMRecipe:
    """How the tiny model is made; d_model 128 and 4 layers train in about a minute on 2 cores."""

    d_model: int = 128
    n_layers: int = 4
    vocab_size: int = 512
    n_docs: int = 8000
    context_length: int = 128
    steps: int = 300
    batch: int = 16
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class TinyLM:
    path: Path  # a Hugging Face folder (config, weights, tokenizer)
    corpus: Path  # the prose file the token sets are cut from
    recipe: LMRecipe
    final_loss: float
    train_seconds: float

    @property
    def hook_layer(self) -> int:
        """The hooked layer: the middle of the stack, as in the stage-one benchmark."""
        return self.recipe.n_layers // 2


def trained_tiny_model(work: Path = DEFAULT_WORK, recipe: LMRecipe = LMRecipe(), log=print) -> TinyLM:
    """Build (or reuse) the corpus, the tokenizer and the briefly trained model."""
    from mdiff.tiny import make_corpus, make_tokenizer, model_config

    d = Path(work) / f"lm-{recipe.key()}"
    done = d / "trained.json"
    if done.exists():
        info = json.loads(done.read_text())
        return TinyLM(d / "model", d / "corpus" / "prose.txt", recipe, info["final_loss"],
                      info["train_seconds"])
    shutil.rmtree(d, ignore_errors=True)
    corpus = make_corpus(d / "corpus", n_docs=recipe.n_docs, seed=recipe.seed)["text"]
    docs = corpus.read_text().split("\n\n")
    tok = make_tokenizer(docs, vocab_size=recipe.vocab_size)
    stream = [i for ids in tok(docs, add_special_tokens=False)["input_ids"]
              for i in (*ids, tok.eos_token_id)]
    body = recipe.context_length - 1
    n_seq = len(stream) // body
    seqs = torch.tensor(stream[: n_seq * body]).view(n_seq, body)
    seqs = torch.cat([torch.full((n_seq, 1), tok.bos_token_id), seqs], dim=1)

    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(
        model_config("llama", len(tok), recipe.d_model, recipe.n_layers))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed)
    log(f"training the tiny model: {recipe.steps} steps of {recipe.batch} x {recipe.context_length} "
        f"tokens (d_model {recipe.d_model}, {recipe.n_layers} layers, vocab {len(tok)})")
    t0 = time.perf_counter()
    model.train()
    loss = torch.tensor(float("nan"))
    threads = torch.get_num_threads()
    # one thread: a few-MFLOP op split over threads waits for each of them to be scheduled, which
    # on a busy machine costs more than it saves (and one thread makes the weights reproducible)
    torch.set_num_threads(1)
    for step in range(recipe.steps):
        lr = recipe.lr * min(1.0, (step + 1) / 30) * (1 - step / recipe.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        ids = seqs[torch.randint(0, n_seq, (recipe.batch,), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            log(f"  step {step + 1}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    done.write_text(json.dumps({"final_loss": loss.item(), "train_seconds": seconds,
                                "recipe": asdict(recipe)}))
    return TinyLM(d / "model", corpus, recipe, loss.item(), seconds)


def add_common_args(ap, json_name: str, repeats: int, model: bool = True) -> None:
    """What every peer benchmark takes: repeats, threads, where to work and write, and (those that
    run the tiny model) its sizes."""
    from benchmarks.common.helpers import RESULTS, ROOT

    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, both sides")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--json", default=str(RESULTS / json_name))
    if model:
        add_model_args(ap)


def only_token_set(store: Path):
    """The one token set of a benchmark's store, opened."""
    from pipeline import store as S

    root = S.StoreRoot(str(store))
    (ts_id,) = root.list_names("tokensets", folders=True)
    return S.open_token_set(root, ts_id)


def add_model_args(ap) -> None:
    """The tiny model's sizes as command-line arguments (defaults: the CPU table's)."""
    r = LMRecipe()
    ap.add_argument("--d-model", type=int, default=r.d_model, help="tiny model width (2048: GPU table)")
    ap.add_argument("--layers", type=int, default=r.n_layers, help="tiny model depth")
    ap.add_argument("--lm-steps", type=int, default=r.steps, help="training steps of the tiny model")


def recipe_from_args(args) -> LMRecipe:
    return LMRecipe(d_model=args.d_model, n_layers=args.layers, steps=args.lm_steps)


def write_experiment(path: Path, lm: TinyLM, *, store: Path, n_tokens: int,
                     validation_fraction: float = 0.0, storage_dtype: str = "bfloat16",
                     batch_size: int = 32, scale_sample_tokens: int = 4096, chunk_tokens: int = 4096,
                     shard_tokens: int = 65536, train: dict | None = None,
                     name: str = "bench-peers") -> Path:
    """An experiment config over the tiny model (one model, its middle layer's resid_post), with
    `train` as its [train] section if given."""
    from pipeline.config_files import write_config

    return write_config(path, {
        "name": name,
        "store": str(store),
        "models": [{"name": "tiny", "path": str(lm.path), "device": "cpu", "dtype": "float32"}],
        "hooks": [{"layer": lm.hook_layer, "site": "resid_post"}],
        "tokens": {"context_length": lm.recipe.context_length, "n_tokens": n_tokens,
                   "validation_fraction": validation_fraction,
                   "sources": [{"kind": "text", "paths": [str(lm.corpus)]}]},
        "cache": {"storage_dtype": storage_dtype, "chunk_tokens": chunk_tokens, "shard_tokens": shard_tokens,
                  "batch_size": batch_size, "scale_sample_tokens": scale_sample_tokens},
        "train": train,
    }, header="Written by benchmarks.common.peer_fixture for the peer benchmarks.")


def saelens_hook_name(lm: TinyLM) -> str:
    """The module SAELens' HookedProxyLM hooks for our resid_post at the hooked layer."""
    return f"model.layers.{lm.hook_layer}"


def token_dataset(tokens, column: str = "tokens"):
    """Our token set's sequences ([n, ctx] int array) as an in-memory Hugging Face dataset, the
    pre-tokenized form SAELens and sparsify read: the peers see exactly our tokens."""
    from datasets import Dataset

    ds = Dataset.from_dict({column: [list(map(int, row)) for row in tokens]})
    ds.set_format(type="torch", columns=[column])
    return ds
