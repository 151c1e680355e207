"""The model's side of the evaluations, done once for every SAE on the same model, hook and scale:
the words' activations and the ground-truth letter probe (absorption), the pooled activations of
the probing texts and the model's own probing baselines.

The words' activations are the costly part (a forward pass per word) and depend only on the
model, the hook, the scale and the absorption settings, so they are kept on disk
(`<study dir>/cache/words-<hash>.safetensors`, with the words in a JSON beside it) and reused by
later runs and other sweeps over the same model.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from evals.saebench.absorption import LetterProbe, evaluate_absorption, fit_letter_probe
from evals.saebench.config import SaeBenchSpec
from evals.saebench.datasets import DatasetUnavailable, split_dataset
from evals.saebench.sparse_probing import average, pool, probe_dataset
from evals.saebench.view import SaeView
from evals.saebench.words import WordData, collect_words
from pipeline.config import HookSpec
from pipeline.records import atomic_write, atomic_write_json, canonical_hash

CACHE_FORMAT = 1


@dataclass
class Group:
    """SAEs that read the same model at the same hook with the same scale."""

    model: str
    hook: HookSpec
    scale: float
    model_key: str  # the store's key of the model's activations (its identity)
    saes: dict[str, SaeView] = field(default_factory=dict)


@dataclass
class ModelSide:
    """What the group's model, loaded lazily, gives every SAE of the group."""

    group: Group
    load: Callable[[], tuple[object, object]]  # -> (LoadedModel, tokenizer)
    spec: SaeBenchSpec
    cache_dir: Path
    progress: bool = True
    log: Callable[[str], None] = print
    seconds: dict[str, float] = field(default_factory=dict)
    _loaded: tuple | None = None
    _words: WordData | None = None
    _probe: LetterProbe | None = None

    def model(self):
        if self._loaded is None:
            self._loaded = self.load()
        return self._loaded

    # ------------------------------------------------------------------ absorption

    def words_key(self) -> str:
        a = self.spec.absorption
        return canonical_hash({"format": CACHE_FORMAT, "model": self.group.model_key, "hook": self.group.hook.label,
                               "scale": self.group.scale, "seed": self.spec.seed, "template": a.prompt_template,
                               "icl": a.icl_examples, "words": a.words, "test_fraction": a.test_fraction})[:16]

    def words(self) -> WordData:
        if self._words is None:
            path = self.cache_dir / f"words-{self.words_key()}.safetensors"
            index = path.with_suffix(".json")
            if path.is_file() and index.is_file():
                tensors, words = load_file(str(path)), json.loads(index.read_text(encoding="utf-8"))["words"]
                self._words = WordData(words, tensors["letters"], tensors["x"], tensors["test"].bool())
                self.log(f"  {self.group.model}: {len(words)} words' activations reused from {path}")
            else:
                started = time.perf_counter()
                lm, tokenizer = self.model()
                self._words = collect_words(lm.model, tokenizer, self.group.hook, self.group.scale,
                                            self.spec.absorption, seed=self.spec.seed, progress=self.progress)
                self.seconds["words"] = time.perf_counter() - started
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                w = self._words
                atomic_write(path, lambda tmp: save_file({"letters": w.letters, "x": w.x.contiguous(),
                                                          "test": w.test.to(torch.uint8)}, str(tmp)))
                atomic_write_json(index, {"words": w.words, "model_key": self.group.model_key,
                                          "hook": self.group.hook.label, "scale": self.group.scale,
                                          "absorption": dataclasses.asdict(self.spec.absorption)})
        return self._words

    def letter_probe(self) -> LetterProbe:
        if self._probe is None:
            started = time.perf_counter()
            device = next(iter(self.group.saes.values())).device
            self._probe = fit_letter_probe(self.words(), self.spec.absorption, device)
            self.seconds["letter_probe"] = time.perf_counter() - started
        return self._probe

    def absorption(self, name: str) -> dict:
        return evaluate_absorption(self.group.saes[name], self.words(), self.letter_probe(), self.spec.absorption,
                                   seed=self.spec.seed)

    # ------------------------------------------------------------------ sparse probing

    def probing(self, names: list[str]) -> dict[str, dict]:
        """Per SAE in `names`: {"mean": scores averaged over datasets, "datasets": ..., "skipped": ...}.
        One forward pass per dataset serves every SAE."""
        spec, started = self.spec.probing, time.perf_counter()
        per_sae: dict[str, dict] = {n: {"datasets": {}, "skipped": {}} for n in names}
        for ds in spec.datasets:
            try:
                split = split_dataset(ds, spec, self.spec.seed, log=self.log)
            except DatasetUnavailable as e:
                self.log(f"  sparse probing: dataset {ds.name!r} skipped: {e}")
                for n in names:
                    per_sae[n]["skipped"][ds.name] = str(e)
                continue
            lm, tokenizer = self.model()
            pooled = pool(lm.model, tokenizer, split, self.group.hook, self.group.scale,
                          {n: self.group.saes[n] for n in names}, spec, progress=self.progress)
            llm = probe_dataset(pooled.model, pooled, spec.ks, "llm", self.spec.seed)
            for n in names:
                sae = probe_dataset(pooled.codes[n], pooled, spec.ks, "sae", self.spec.seed)
                tasks = {c: {**llm["tasks"][c], **sae["tasks"][c]} for c in llm["tasks"]}
                per_sae[n]["datasets"][ds.name] = {**{k: v for k, v in llm.items() if k != "tasks"},
                                                   **{k: v for k, v in sae.items() if k != "tasks"},
                                                   "tasks": tasks, "classes": split.classes,
                                                   "n_train": sum(map(len, split.train.values())),
                                                   "n_test": sum(map(len, split.test.values()))}
        for n in names:
            rows = [{k: v for k, v in r.items() if isinstance(v, float)} for r in per_sae[n]["datasets"].values()]
            per_sae[n]["mean"] = average(rows)
        self.seconds["probing"] = self.seconds.get("probing", 0.0) + time.perf_counter() - started
        return per_sae
