"""Render a results dictionary (results.json) as report.html and report.md, with PNG figures.

The report reads numbers and arranges them: tables, figures and a discussion whose sentences are
built from the measured figures. It runs no model and quantizes nothing; its only arithmetic is
differences and ratios of numbers already in the results (the change from float accuracy, the
share of a tensor's observed range a clip range keeps). Every key but "rows" is optional.

The report builds its page as a list of intq.report.document blocks, formats its numbers with that
module's helpers and leaves writing the HTML, Markdown and PNG files to `document.write_document`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from matplotlib.figure import Figure

from intq.report import plots
from intq.report.document import (MISSING, Block, Heading, Image, Paragraph, Table, delta, file_names,
                           integer, join, num, pct, points, seconds, share, write_document)
from intq.files import ensure_writable_dir
from intq.report.tradeoffs_report import tradeoff_section

# The only stage names the report knows: their order. Unknown stages follow, as they appear.
STAGES = ("float", "weights", "weights+bias-float", "weights+activations", "integer+bias")
_STAGE_NOTES = {
    "float": "the trained float32 model (study Q1)",
    "weights": "int8 weights, float activations (Q2)",
    "weights+bias-float": "int8 weights with the bias left in float (Q5, first half)",
    "weights+activations": "int8 weights and int8 activations (Q4)",
    "integer+bias": "integer-only model with an int32 bias (Q5)",
}
_STEPS = (  # (from stage, to stage, what the step changes)
    ("weights", "weights+activations", "Quantizing the activations on top of the weights"),
    ("weights+bias-float", "integer+bias",
     "Going from int8 weights with a float bias to the integer model with an int32 bias"),
)
TITLE = "intq — integer-only post-training quantization report"


def _ordered(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


# ---- accuracies -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Accuracy:
    """Measured rows keyed (model, stage, preset or None) and published ones keyed (model, stage)."""
    measured: Mapping[tuple[str, str, str | None], float]
    published: Mapping[tuple[str, str], float]

    @classmethod
    def from_results(cls, results: Mapping[str, Any]) -> "_Accuracy":
        rows = results.get("rows") or []
        measured = {(r["model"], r["stage"], r.get("preset")): r["accuracy"] for r in rows
                    if r.get("accuracy") is not None}
        published = {(r["model"], r["stage"]): r["accuracy"]
                     for r in results.get("published") or [] if r.get("accuracy") is not None}
        return cls(measured, published)

    @property
    def models(self) -> list[str]:
        return _ordered([key[0] for key in self.measured] + [key[0] for key in self.published])

    @property
    def presets(self) -> list[str]:
        return _ordered(key[2] for key in self.measured if key[2] is not None)

    def stages(self, model: str) -> list[str]:
        found = _ordered([k[1] for k in self.measured if k[0] == model]
                         + [k[1] for k in self.published if k[0] == model])
        return sorted(found, key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES))

    def value(self, model: str, stage: str, preset: str) -> float | None:
        """A preset's accuracy; a row without a preset (the float model) serves every preset."""
        return self.measured.get((model, stage, preset), self.measured.get((model, stage, None)))

    def change(self, model: str, stage: str, preset: str) -> float | None:
        value, base = self.value(model, stage, preset), self.value(model, "float", preset)
        return None if value is None or base is None else value - base

    def published_change(self, model: str, stage: str) -> float | None:
        value, base = self.published.get((model, stage)), self.published.get((model, "float"))
        return None if value is None or base is None else value - base


# ---- discussion: every sentence is made of the numbers it reports ------------------------------
def _stage_sentence(acc: _Accuracy, model: str, stage: str) -> str:
    changes = {p: acc.change(model, stage, p) for p in acc.presets}
    changes = {p: c for p, c in changes.items() if c is not None}
    published = acc.published_change(model, stage)
    parts = []
    if published is not None:
        parts.append(f"the study went from {pct(acc.published[(model, 'float')])}% to "
                     f"{pct(acc.published[(model, stage)])}% ({delta(published)} points)")
    if changes:
        parts.append("here " + join([f"the {p} preset reaches {pct(acc.value(model, stage, p))}% "
                                      f"({delta(c)})" for p, c in changes.items()]))
    if not parts:
        return ""
    sentence = f"{model}, {stage}: " + "; ".join(parts) + "."
    if len(changes) >= 2:
        best, worst = max(changes, key=changes.get), min(changes, key=changes.get)
        if round(changes[best] - changes[worst], 2) == 0:
            sentence += f" The presets lose the same ({delta(changes[best])})."
        else:
            sentence += (f" The {best} preset keeps {points(changes[best] - changes[worst])} "
                         f"more than the {worst} preset.")
    if changes and published is not None:
        best = max(changes, key=changes.get)
        verdict = "less" if changes[best] >= published else "more"
        which = f"The {best} preset" + (", the best here," if len(changes) > 1 else "")
        sentence += f" {which} loses {points(changes[best] - published)} {verdict} than the study did."
    return sentence


def _step_sentence(acc: _Accuracy, model: str, before: str, after: str, what: str) -> str:
    steps = {}
    for preset in acc.presets:
        a, b = acc.value(model, before, preset), acc.value(model, after, preset)
        if a is not None and b is not None:
            steps[preset] = b - a
    study = (acc.published.get((model, before)), acc.published.get((model, after)))
    parts = []
    if None not in study:
        parts.append(f"by {delta(study[1] - study[0])} points in the study "
                     f"({pct(study[0])}% → {pct(study[1])}%)")
    if steps:
        parts.append("here by " + join([f"{delta(d)} with {p}" for p, d in steps.items()]))
    return f"{what} changes {model}'s accuracy " + "; ".join(parts) + "." if parts else ""


def _bias_sentence(acc: _Accuracy, model: str) -> str:
    """Explain a study bias-stage loss much larger than ours, when the numbers show one."""
    published = acc.published_change(model, "weights+bias-float")
    ours = [c for c in (acc.change(model, "weights+bias-float", p) for p in acc.presets) if c is not None]
    if published is None or not ours or published > max(ours) - 1.0:
        return ""
    text = (f"The study's weights+bias-float stage lost {points(published)} on {model}, "
            f"{points(max(ours) - published)} more than the best preset here. Its weight-only "
            "model ran on the scaled integer weights (about w·s) but kept the bias in float units, "
            "so next to outputs scaled by the product of every layer's weight scale the bias all "
            "but vanished; here the weights are dequantized to real units and the bias keeps its "
            "effect.")
    recovered = acc.published_change(model, "integer+bias")
    if recovered is not None:
        text += (f" With its int32 bias (scale s_x·s_w) the study's integer model stood at "
                 f"{delta(recovered)} points from float.")
    return text


def _weights_sentence(model: str, layers: Mapping[str, Mapping[str, Any]]) -> str:
    spans = {name: (s["max"] - s["min"]) / s["std"] for name, s in layers.items()
             if s.get("std") and s.get("max") is not None and s.get("min") is not None}
    if not spans:
        return ""
    ordered = sorted(spans, key=spans.get, reverse=True)
    text = (f"{model}'s weights span, in standard deviations: "
            + join([f"{n} {spans[n]:.1f}σ ({num(layers[n]['min'])} to {num(layers[n]['max'])})"
                     for n in ordered]) + ".")
    clipped = [n for n in ordered if layers[n].get("mean") is not None and (
        layers[n]["min"] < layers[n]["mean"] - 3 * layers[n]["std"]
        or layers[n]["max"] > layers[n]["mean"] + 3 * layers[n]["std"])]
    if clipped:
        text += f" A mean ± 3σ range, the study's choice, saturates the tails of {join(clipped)}."
    else:
        text += " A mean ± 3σ range, the study's choice, covers every layer's full range."
    return text


def _kept(stats: Mapping[str, Any], clip: Sequence[float] | None) -> float | None:
    """Share of the observed [min, max] that the clip range [lo, hi] keeps."""
    low, high = stats.get("min"), stats.get("max")
    if not clip or None in clip[:2] or low is None or high is None or high <= low:
        return None
    return max(0.0, min(clip[1], high) - max(clip[0], low)) / (high - low)


def _clip_presets(tensors: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return _ordered(p for stats in tensors.values() for p in (stats.get("clip") or {}))


def _clip_sentence(model: str, tensors: Mapping[str, Mapping[str, Any]], preset: str) -> str:
    kept = {t: _kept(s, (s.get("clip") or {}).get(preset)) for t, s in tensors.items()}
    kept = {t: k for t, k in kept.items() if k is not None}
    if not kept:
        return ""
    least, most = min(kept, key=kept.get), max(kept, key=kept.get)
    text = (f"For {model}, the {preset} clip ranges keep between {share(kept[least])} ({least}) "
            f"and {share(kept[most])} ({most}) of each tensor's observed range")
    wasted = {}
    for name, stats in tensors.items():
        clip = (stats.get("clip") or {}).get(preset)
        if clip and stats.get("min") is not None and stats["min"] >= 0 and clip[0] < 0 < clip[1]:
            wasted[name] = -clip[0] / (clip[1] - clip[0])
    if wasted:
        low, high = min(wasted.values()), max(wasted.values())
        span = share(low) if share(low) == share(high) else f"{share(low)}–{share(high)}"
        text += (f"; on {join(list(wasted))}, which are never negative, {span} of its codes "
                 "stand for negative values that never occur")
    return text + "."


def _agreement_sentence(agreement: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> str:
    entries = [(m, p, e) for m, by_preset in agreement.items() for p, layers in by_preset.items()
               for e in layers]
    if not entries:
        return ""
    differing = [(m, p, e) for m, p, e in entries if e.get("differing")]
    total = sum(e.get("values") or 0 for _, _, e in entries)
    text = (f"The integer reference executor and the fake-quant simulation agree exactly on "
            f"{len(entries) - len(differing)} of {len(entries)} layer outputs ({integer(total)} values)")
    if differing:
        text += "; they differ on " + join(
            [f"{m} ({p}) {e.get('layer', '?')}, {integer(e['differing'])} of {integer(e.get('values'))} "
             f"values by at most {integer(e.get('max_lsb'))} LSB" for m, p, e in differing])
    return text + "."


def _discussion(results: Mapping[str, Any], acc: _Accuracy) -> list[Block]:
    paragraphs = [" ".join(filter(None, [_stage_sentence(acc, m, s) for s in acc.stages(m)
                                         if s != "float"])) for m in acc.models]
    paragraphs.append(" ".join(filter(None, [_step_sentence(acc, m, *step) for m in acc.models
                                             for step in _STEPS]
                                      + [_bias_sentence(acc, m) for m in acc.models])))
    weights = results.get("weights") or {}
    paragraphs.append(" ".join(filter(None, [_weights_sentence(m, w) for m, w in weights.items()])))
    activations = results.get("activations") or {}
    paragraphs.append(" ".join(filter(None, [_clip_sentence(m, t, p) for m, t in activations.items()
                                             for p in _clip_presets(t)])))
    paragraphs.append(_agreement_sentence(results.get("agreement") or {}))
    texts = [text for text in paragraphs if text]
    return [Heading("Discussion", anchor="discussion"), *map(Paragraph, texts)] if texts else []


# ---- sections: each returns its blocks, or none when its key is absent -----------------------
def _accuracy_section(acc: _Accuracy) -> list[Block]:
    presets = acc.presets
    header = ("model", "stage", "published", "Δ published",
              *[name for p in presets for name in (p, f"Δ {p}")])
    rows, labels = [], []
    for model in acc.models:
        for stage in acc.stages(model):
            cells = [model, stage, pct(acc.published.get((model, stage))),
                     delta(acc.published_change(model, stage))]
            for preset in presets:
                cells += [pct(acc.value(model, stage, preset)), delta(acc.change(model, stage, preset))]
            rows.append(tuple(cells))
            labels.append(f"{model} {stage}")
    if not rows:
        return []
    notes = "; ".join(f"{s}: {_STAGE_NOTES[s]}" for s in STAGES
                      if s in _STAGE_NOTES and any(s in acc.stages(m) for m in acc.models))
    blocks: list[Block] = [
        Heading("Accuracy", anchor="accuracy"),
        Paragraph("Top-1 accuracy on the test set, in percent. 'published' is the study's own number "
                  "(original CIFAR-10, GPU); Δ is the change from the same model's float accuracy, "
                  f"in points. Stages — {notes}."),
        Table(header, tuple(rows), labels=2)]
    blocks.append(Image("accuracy.png", "accuracy by stage: published and each preset",
                        _accuracy_figure(acc, labels)))
    return blocks


def _accuracy_figure(acc: _Accuracy, labels: list[str]) -> Figure:
    pairs = [(m, s) for m in acc.models for s in acc.stages(m)]
    accuracy = [("published (study)", plots.PUBLISHED_COLOR, [acc.published.get(p) for p in pairs])]
    change = [("published (study)", plots.PUBLISHED_COLOR, [acc.published_change(*p) for p in pairs])]
    for index, preset in enumerate(acc.presets):
        color = plots.preset_color(index)
        accuracy.append((preset, color, [acc.value(m, s, preset) for m, s in pairs]))
        change.append((preset, color, [acc.change(m, s, preset) for m, s in pairs]))
    return plots.accuracy_figure(labels, accuracy, change)


def _weights_section(weights: Mapping[str, Any], files: Mapping[str, str]) -> list[Block]:
    blocks: list[Block] = [Heading("Q1 — weights", anchor="weights")] if weights else []
    for model, layers in weights.items():
        rows = tuple((name, "×".join(map(str, s.get("shape") or [])) or MISSING, num(s.get("min")),
                      num(s.get("max")), num(s.get("mean")), num(s.get("std")))
                     for name, s in layers.items())
        blocks += [Heading(model, level=3),
                   Image(f"weights_{files[model]}.png", f"{model} weight histograms",
                         plots.weights_figure(model, layers)),
                   Table(("layer", "shape", "min", "max", "mean", "std"), rows, labels=2)]
    return blocks


def _activation_row(name: str, stats: Mapping[str, Any], presets: Sequence[str]) -> tuple[str, ...]:
    sigma = stats.get("sigma3") or (None, None)
    cells = [name, *(num(stats.get(k)) for k in ("min", "max", "mean", "std")),
             num(sigma[0]), num(sigma[1])]
    for preset in presets:
        clip = (stats.get("clip") or {}).get(preset) or (None, None)
        cells += [num(clip[0]), num(clip[1]), share(_kept(stats, clip))]
    return tuple(cells)


def _activations_section(activations: Mapping[str, Any], files: Mapping[str, str]) -> list[Block]:
    blocks: list[Block] = []
    for model, tensors in activations.items():
        presets = _clip_presets(tensors)
        header = ("tensor", "min", "max", "mean", "std", "3σ lo", "3σ hi",
                  *[c for p in presets for c in (f"{p} lo", f"{p} hi", f"{p} keeps")])
        rows = tuple(_activation_row(name, stats, presets) for name, stats in tensors.items())
        blocks += [Heading(model, level=3),
                   Image(f"activations_{files[model]}.png", f"{model} activation histograms",
                         plots.activations_figure(model, tensors, presets)),
                   Table(header, rows)]
    if blocks:
        blocks[:0] = [Heading("Q3 — activations", anchor="activations"),
                      Paragraph("Calibration statistics of the input and of each layer's output. "
                                "'keeps' is the share of the observed range [min, max] inside the "
                                "preset's clip range.")]
    return blocks


# ---- run facts --------------------------------------------------------------------------------
def _training_section(training: Mapping[str, Any]) -> list[Block]:
    rows = tuple((model, seconds(info.get("seconds")), "yes" if info.get("cached") else "no",
                  str(len(info.get("losses") or [])),
                  num(info["losses"][-1][2]) if info.get("losses") else MISSING)
                 for model, info in training.items() if isinstance(info, Mapping))
    if not rows:
        return []
    blocks: list[Block] = [Heading("Training", anchor="training"),
                           Table(("model", "seconds", "cached", "logged points", "final loss"), rows)]
    figure = plots.loss_figure(training)
    if figure is not None:
        blocks.insert(1, Image("training_loss.png", "training loss per model", figure))
    return blocks


def _agreement_section(agreement: Mapping[str, Any], images: Any = None) -> list[Block]:
    rows = tuple((model, preset, e.get("layer", "?"), integer(e.get("values")), integer(e.get("differing")),
                  integer(e.get("max_lsb")))
                 for model, by_preset in agreement.items() for preset, entries in by_preset.items()
                 for e in entries)
    if not rows:
        return []
    return [Heading("Integer executor vs fake-quant simulation", anchor="agreement"),
            Paragraph("Per layer output" + (f", on the first {integer(images)} test images" if images else "")
                      + ": how many values the reference integer executor and the float64 fake-quant "
                      "simulation produce from the same integer input, how many differ, and by how many LSB."),
            Table(("model", "preset", "layer", "values", "differing", "max LSB"), rows, labels=3)]


def _run_section(results: Mapping[str, Any]) -> list[Block]:
    timings = results.get("timings_s") or {}
    models = results.get("models") or []
    blocks: list[Block] = []
    if timings:
        blocks += [Heading("Timings", level=3),
                   Table(("step", "seconds"), tuple((k, seconds(v)) for k, v in timings.items()))]
    if models:
        blocks += [Heading("Integer model files", level=3),
                   Table(("model", "preset", "file", "bytes"), tuple(
                       (m.get("model", "?"), m.get("preset") or MISSING, m.get("file", "?"),
                        integer(m.get("bytes"))) for m in models), labels=3)]
    return [Heading("Run", anchor="run"), *blocks] if blocks else []


def _header(results: Mapping[str, Any]) -> list[Block]:
    config = results.get("config") or {}
    facts = [f"{label}: {config[key]}" for key, label in (
        ("seed", "seed"), ("device", "device"), ("data_source", "data"), ("machine", "machine"))
        if config.get(key) is not None]
    calib = config.get("calib_samples") or {}
    if calib:
        facts.append("calibration samples: " + ", ".join(f"{p} {integer(n)}" for p, n in calib.items()))
    if config.get("activation_images") is not None:
        facts.append(f"activation statistics from {integer(config['activation_images'])} images")
    if results.get("intq_version"):
        facts.append(f"intq {results['intq_version']}")
    blocks: list[Block] = [Heading(TITLE, level=1)]
    if facts:
        blocks.append(Paragraph(" · ".join(facts)))
    presets = config.get("presets") or {}
    if presets:
        blocks.append(Paragraph("Presets: " + "; ".join(f"{p} — {d}" for p, d in presets.items())))
    return blocks


def write_report(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write report.html, report.md and the PNG figures into out_dir; return the paths written.

    `results` has the layout of results.json; only "rows" is needed for a useful report, every
    other key (published, weights, activations, training, agreement, timings_s, models, config)
    adds its section when present. The paths come back PNGs first, then the HTML, then the
    Markdown; every file is written atomically.
    """
    ensure_writable_dir(out_dir)  # fail before drawing any figure
    acc = _Accuracy.from_results(results)
    weights, activations = results.get("weights") or {}, results.get("activations") or {}
    files = file_names(_ordered([*acc.models, *weights, *activations, *(results.get("tradeoffs") or {})]))
    config = results.get("config") or {}
    blocks = [*_header(results), *_accuracy_section(acc), *_discussion(results, acc),
              *tradeoff_section(results, files),
              *_weights_section(weights, files), *_activations_section(activations, files),
              *_training_section(results.get("training") or {}),
              *_agreement_section(results.get("agreement") or {}, config.get("agreement_images")),
              *_run_section(results)]
    return write_document(blocks, out_dir, TITLE)
