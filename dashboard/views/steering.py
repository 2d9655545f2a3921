"""The feature page's steering panel: generate with the feature added to model A, B or both,
baseline and steered side by side (streamed), sweep strengths in one batched generation,
and save samples to the database.

The panel is a fragment behind a form, so typing and sliding do not rerun the page and a
generation reruns only the panel. The engine plans and runs the steering
(`engine.steering.run.plan_steering`): for a model the feature has no decoder in, that is
the shared-partition transfer, and the plan's note says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import streamlit as st

from dashboard import data, models
from dashboard.markdown import md, md_code
from dashboard.views.common import TEXT_STYLE, esc, fmt
from engine import categories
from engine.errors import UserError
from engine.results import ResultsDBError
from engine.steering.run import SteeringPlan, plan_steering, steering_problem, stream_text
from engine.steering.steer import GenerationConfig, check_prompt

DEFAULTS = {
    "s_prompt": "Tell me about your favourite drink.",
    "s_alpha": 4.0,
    "s_target": "a",
    "s_sample": False,
    "s_temperature": 0.7,
    "s_seed": 0,
    "s_max_new": 48,
    "s_sweep": "0 2 4 6 8 10",
}
GENERATION_ERRORS = (UserError, ValueError, RuntimeError)
# Characters Markdown (or Streamlit's LaTeX) would interpret in streamed model text.
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$])")


def steering_panel(path: str, run_id: str, feature_id: int, run: dict, stats: dict) -> None:
    """The steering section of a feature page."""
    st.subheader("Steering")
    s_max = float(stats.get("s_max") or 0.0)
    st.caption(
        f"Adds α × s_max × the feature's decoder vector to the residual stream at the "
        f"crosscoder's layer while the model generates. s_max = {fmt(s_max)} is the feature's "
        "largest activation in the analysed text, so α = 1 adds it at full natural strength "
        "(paper B.4.3)."
    )
    reason = steering_problem(run)
    if reason:
        st.info(models.enable_help(reason))
        return
    if s_max <= 0:
        st.info("This feature never activated in the analysed text (s_max = 0): nothing to steer.")
        return
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)
    _panel(path, run_id, feature_id, run, stats)


@st.fragment
def _panel(path: str, run_id: str, feature_id: int, run: dict, stats: dict) -> None:
    """The form, the generation it asks for, and the last result with its save button."""
    names = {k: models.model_name(run, k) for k in "ab"}
    targets = {
        "a": f"A · {names['a']}",
        "b": f"B · {names['b']}",
        "both": "both",
    }
    with st.form("steer_form"):
        prompt = st.text_area("Prompt", key="s_prompt", height=80)
        top = st.columns([3, 2])
        alpha = top[0].slider(
            "Strength α (in units of s_max)",
            -10.0,
            10.0,
            step=0.5,
            key="s_alpha",
            help="Negative values subtract the feature.",
        )
        target = top[1].radio(
            "Steer model", list(targets), format_func=targets.get, horizontal=True, key="s_target"
        )
        note = _exclusive_note(stats.get("partition"))
        if note:
            top[1].caption(note)
        dec = st.columns(4)
        sample = dec[0].toggle(
            "Sample", key="s_sample", help="Off: greedy decoding. On: temperature, top-p 0.9, seed."
        )
        temperature = dec[1].number_input(
            "Temperature", 0.05, 2.0, step=0.05, key="s_temperature", help="Used when sampling."
        )
        seed = dec[2].number_input("Seed", 0, 2**31 - 1, step=1, key="s_seed")
        max_new = dec[3].number_input("Max new tokens", 1, 512, step=8, key="s_max_new")
        sweep_text = st.text_input(
            "Strength sweep: α values",
            key="s_sweep",
            help="All strengths are generated in one batch (one row each), baseline α = 0 "
            "included.",
        )
        buttons = st.columns([1, 1, 5])
        generate = buttons[0].form_submit_button("Generate", type="primary")
        sweep = buttons[1].form_submit_button("Strength sweep")

    cfg = GenerationConfig(
        max_new_tokens=int(max_new),
        greedy=not sample,
        temperature=float(temperature),
        seed=int(seed),
    )
    key = (run_id, feature_id)
    if generate or sweep:
        keys = ("a", "b") if target == "both" else (target,)
        try:
            alphas = _alphas(sweep_text) if sweep else [float(alpha)]
            if not prompt.strip():
                raise UserError("type a prompt first")
            check_prompt(prompt)  # before the models load or the generation lock is taken
            loaded = models.load(run, keys)
            feature = data.feature(path, run_id, feature_id)
            plans = {
                k: plan_steering(run, feature, k, loaded.crosscoder, loaded.normalizer)
                for k in keys
            }
            with models.in_use():
                if generate:
                    result = _generate(plans, loaded.models, prompt, alphas[0], cfg, names)
                else:
                    result = _sweep(plans, loaded.models, prompt, alphas, cfg, names)
        except models.Unavailable as err:
            st.info(str(err))
            return
        except GENERATION_ERRORS as err:
            st.error(f"Cannot steer: {err}")
            return
        st.session_state["s_result"] = {"key": key, **result}
    else:
        result = st.session_state.get("s_result")
        if result is None or result["key"] != key:
            result = None
        elif result["kind"] == "generate":
            _show_generation(result, names)
        else:
            _show_sweep(result, names)
    if result is not None:
        _save_button(path, run_id, feature_id, st.session_state["s_result"])
    _saved_samples(path, run_id, feature_id)


def _exclusive_note(partition: Any) -> str | None:
    """A caption for an exclusive feature: the other model is steered through a transfer."""
    if partition == categories.A_EXCLUSIVE:
        return "A-exclusive: model B has no decoder for it and is steered through a transfer."
    if partition == categories.B_EXCLUSIVE:
        return "B-exclusive: model A has no decoder for it and is steered through a transfer."
    return None


def _alphas(text: str) -> list[float]:
    """The sweep's strengths from "0 2 4" or "0, 2, 4", baseline 0 first."""
    try:
        values = [float(v) for v in re.split(r"[\s,;]+", text.strip()) if v]
    except ValueError:
        raise UserError(f"strengths must be numbers separated by spaces, got {text!r}") from None
    if not values or len(values) > 21:
        raise UserError("give between 1 and 21 strengths for a sweep")
    values = [0.0] + [v for v in dict.fromkeys(values) if v != 0.0]
    return values


# -- one strength: baseline and steered, streamed ------------------------------------------


def _generate(
    plans: dict[str, SteeringPlan], loaded: dict, prompt: str, alpha: float, cfg, names: dict
) -> dict[str, Any]:
    """Stream baseline and steered continuations of each model; return what was shown."""
    rows = []
    for key, plan in plans.items():
        model = loaded[key]
        row = {"model": key, "layer": plan.layer, "s_max": plan.s_max, "note": plan.note}
        base, steered = _pair_layout(
            row,
            names,
            alpha,
            lambda m=model: _streamed(stream_text(m, prompt, cfg)),
            lambda m=model, p=plan: _streamed(p.stream(m, prompt, alpha, cfg)),
        )
        sample = plan.sample(prompt, alpha, cfg, base, steered)
        rows.append({**row, "baseline": base, "steered": steered, "sample": sample})
    return {"kind": "generate", "alpha": alpha, "rows": rows, "saved": None}


def _show_generation(result: dict[str, Any], names: dict) -> None:
    """The last generation again, as static text."""
    for row in result["rows"]:
        _pair_layout(
            row,
            names,
            result["alpha"],
            lambda r=row: _box(r["baseline"]),
            lambda r=row: _box(r["steered"]),
        )


def _pair_layout(
    row: dict[str, Any],
    names: dict,
    alpha: float,
    left: Callable[[], str],
    right: Callable[[], str],
) -> tuple[str, str]:
    """One model's header, transfer note, and baseline | steered columns."""
    model = row["model"]
    st.markdown(f"**Model {model.upper()}** · {md_code(names[model])} · layer {row['layer']}")
    if row["note"]:
        st.info(row["note"], icon=":material/swap_horiz:")
    cols = st.columns(2)
    with cols[0]:
        st.caption("Baseline (α = 0)")
        base = left()
    with cols[1]:
        shift = alpha * row["s_max"]
        st.caption(f"Steered: α = {alpha:g} (adds {shift:.3g} × the feature's vector)")
        steered = right()
    return base, steered


def _streamed(pieces: Iterable[str]) -> str:
    """Write a text as it is generated, then replace it by its box; return the text."""
    raw: list[str] = []

    def markdown_safe() -> Iterator[str]:
        for piece in pieces:
            raw.append(piece)
            yield _MARKDOWN.sub(r"\\\1", piece).replace("\n", "  \n")

    slot = st.empty()
    with slot:
        st.write_stream(markdown_safe())
    text = "".join(raw)
    slot.html(_box_html(text))
    return text


def _box(text: str) -> str:
    """Show a generated text in a box; return it."""
    st.html(_box_html(text))
    return text


def _box_html(text: str) -> str:
    """A generated text as escaped HTML in the style of the contexts."""
    body = esc(text) if text.strip() else "<em style='color:#888'>(no text generated)</em>"
    return f'<div class="steer-text" style="{TEXT_STYLE}">{body}</div>'


# -- a strength sweep: one batched generation per model ----------------------------------------


def _sweep(
    plans: dict[str, SteeringPlan], loaded: dict, prompt: str, alphas: list[float], cfg, names
) -> dict[str, Any]:
    """Generate every strength for each model in one batch each; show and return the texts."""
    texts, notes, samples = {}, {}, []
    for key, plan in plans.items():
        label = f"model {key.upper()}: {len(alphas)} strengths in one batch"
        with st.spinner(f"Generating {label} ..."):
            out = plan.sweep(loaded[key], prompt, alphas, cfg)
        texts[key], notes[key] = out, plan.note
        pairs = zip(alphas, out, strict=True)
        samples += [plan.sample(prompt, a, cfg, out[0], t) for a, t in pairs if a]
    result = {"kind": "sweep", "alphas": alphas, "texts": texts, "notes": notes}
    result.update(samples=samples, saved=None)
    _show_sweep(result, names)
    return result


def _show_sweep(result: dict[str, Any], names: dict) -> None:
    """The sweep as a table: one row per strength, one column per model."""
    keys = list(result["texts"])
    for key in keys:
        if result["notes"].get(key):
            st.info(result["notes"][key], icon=":material/swap_horiz:")
    head = "".join(f"<th>Model {k.upper()} · {esc(names[k])}</th>" for k in keys)
    rows = []
    for i, alpha in enumerate(result["alphas"]):
        label = "0 (baseline)" if alpha == 0 else f"{alpha:g}"
        cells = "".join(
            f"<td style='vertical-align:top'>{_box_html(result['texts'][k][i])}</td>" for k in keys
        )
        first = f"<td style='vertical-align:top; white-space:nowrap'>α = {esc(label)}</td>"
        rows.append(f"<tr>{first}{cells}</tr>")
    # Fixed layout: equal columns per model, whatever each model generated.
    st.html(
        "<table class='steer-sweep' style='width:100%; border-collapse:collapse; "
        "table-layout:fixed'><col style='width:8.5rem'>"
        f"<tr style='text-align:left'><th>strength</th>{head}</tr>{''.join(rows)}</table>"
    )


# -- saving ----------------------------------------------------------------------------------


def _save_button(path: str, run_id: str, feature_id: int, result: dict[str, Any]) -> None:
    """Save the last generation (or sweep) as steering samples, once."""
    n = len(result["rows"]) if "rows" in result else len(result["samples"])
    if result.get("saved"):
        st.success(f"Saved as steering sample(s) {', '.join(map(str, result['saved']))}.")
        return
    if result.get("save_error"):
        st.error(f"Not saved: {md(result['save_error'])}")
    st.button(
        "Save sample" if n == 1 else f"Save {n} samples",
        key="s_save",
        icon=":material/save:",
        on_click=_save,
        args=(path, run_id, feature_id, result),
        help="Record the prompt, settings and texts in the results database",
    )


def _save(path: str, run_id: str, feature_id: int, result: dict[str, Any]) -> None:
    """Write the result's samples (the button's callback, so the rerun shows them saved)."""
    samples = [r["sample"] for r in result["rows"]] if "rows" in result else result["samples"]
    author = str(st.session_state.get("reviewer") or "")
    try:
        result["saved"] = data.save_steering_samples(
            path, run_id, feature_id, [{**s, "author": author} for s in samples]
        )
        result.pop("save_error", None)
    except ResultsDBError as err:  # the file stayed locked by another process: try again
        result["save_error"] = str(err)


def _saved_samples(path: str, run_id: str, feature_id: int) -> None:
    """The feature's saved steering samples."""
    saved = data.steering_samples(path, run_id, feature_id)
    if saved.empty:
        return
    with st.expander(f"Saved steering samples of this feature ({len(saved)})"):
        shown = saved.assign(
            model=saved["model"].str.upper(),
            translated=saved["transfer"].map(lambda t: bool(t)),
        )[["created_at", "model", "alpha", "prompt", "baseline", "steered", "translated", "author"]]
        st.dataframe(
            shown,
            hide_index=True,
            width="stretch",
            column_config={"alpha": st.column_config.NumberColumn("α", format="%g")},
        )
