"""Models: what is trained, with its cross-validated metrics; train, score and delete.

Training (``train``) and scoring (``score:<model>``) run as background jobs in
the process-wide job runner: they open the store read-write in their own
thread and keep going when the user changes page; this page reads their
progress on every visit, every second. Reads are cached per store
fingerprint (``_common.query``), so a finished job's results appear without
clearing any cache.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from cmil_core import store as store_mod
from cmil_core.analysis import display
from cmil_core.errors import InputError
from cmil_core.model import mil, modeling
from cmil_core.model.distributed import ray_address
from cmil_core.ops.jobs import Job
from cmil_core.outputs.evaluation import discrimination
from cmil_core.store.model_rules import read_model_scores
from pages import _common
from pages._common import flash, md, show_flash

TRAIN_JOB = "train"
SEEN = "models_jobs_seen"
ENCODERS = ("smallcnn", "resnet18", "resnet34", "resnet50")
AGGREGATOR_HELP = {
    "histogram": "the study's cMIL: patch classifier → probability histogram + TF-IDF → "
                 "logistic regression",
    "attention": "gated attention MIL (Ilse et al. 2018)",
}
# How the patch CNN is used: frozen as loaded, or trained with the patients' labels.
CNN_TRAINING = {"auto": "auto (trained unless the study is tiny)",
                "finetune": "trained on the smears (the study's)", "frozen": "frozen (fast)"}
# The hyper-parameters offered here, per aggregator; the rest keep their defaults
# (cmil train --param NAME=VALUE sets any of them).
SHOWN_PARAMS = {
    "histogram": ("max_epochs", "lr", "dropout", "hidden", "n_bins", "C"),
    "attention": ("max_epochs", "lr", "dropout", "embed_dim", "attention_dim"),
}

def score_job_name(model_id: str) -> str:
    return f"score:{model_id}"

def scored_label(row: Any) -> str:
    """``B (24)``, marked when the scores are stale or made despite a tiling mismatch."""
    marks = [m for m, on in (("stale", row.stale), ("tiling differs", row.tiling_mismatch))
             if on is not None and not pd.isna(on) and on]
    return f"{row.cohort} ({row.patients}{', ' + ', '.join(marks) if marks else ''})"


def model_table(rows: list[store_mod.ModelRow], scored: pd.DataFrame,
                marks: dict[str, pd.DataFrame] | None = None,
                cv_ci: dict[str, tuple[float | None, float | None]] | None = None) -> pd.DataFrame:
    """Every model, one row each; :data:`WHAT_COLUMNS` and :data:`HOW_COLUMNS` split it in two
    tables so that every column shows at 1280 px. ``cv_ci``: the DeLong 95% CI of each
    model's cross-validated AUC (its out-of-fold scores)."""
    records = []
    stale_models = set() if marks is None else set(
        marks["models"].loc[marks["models"]["stale"], "model_id"])
    for m in rows:
        cv = m.metrics.get("cv_auc")
        folds = m.metrics.get("cv_fold_aucs") or []
        mine = scored[scored["model_id"] == m.model_id]
        if marks is not None:
            mine = marks["scores"][marks["scores"]["model_id"] == m.model_id]
        decision = (m.config.get("qc_decision") or {}).get("decision_id")
        records.append(
            {
                "Model": m.model_id,
                "Created (UTC)": m.created_at,
                "Aggregator": m.aggregator,
                "Encoder": m.encoder,
                "Training cohort": m.train_cohorts,
                "Patients trained on (BM+)": (
                    f"{m.metrics.get('n_train', '?')} ({m.metrics.get('n_positive', '?')})"
                ),
                "CV AUC (95% CI)": "—" if cv is None else display.estimate_ci(
                    cv, *((cv_ci or {}).get(m.model_id) or (None, None))),
                "CV folds": m.metrics.get("cv_k"),
                "Fold AUCs": ", ".join("—" if a is None else f"{a:.2f}" for a in folds),
                "Cutoff": display.cutoff(m.cutoff),
                "Seed": m.config.get("seed"),
                "QC": (f"stale (trained on decision {decision or '—'})"
                       if m.model_id in stale_models
                       else (f"decision {decision}" if decision else "—")),
                "Scored": ", ".join(
                    scored_label(r) if marks is not None else f"{r.cohort} ({r.patients})"
                    for r in mine.itertuples()) or "—",
            }
        )
    return pd.DataFrame(records)

WHAT_COLUMNS = ["Model", "Created (UTC)", "Aggregator", "Encoder", "Training cohort",
                "Patients trained on (BM+)", "Seed", "QC"]
HOW_COLUMNS = ["Model", "CV AUC (95% CI)", "CV folds", "Fold AUCs", "Cutoff", "Scored"]


def cv_intervals(
    store: store_mod.Store, rows: list[store_mod.ModelRow]
) -> dict[str, tuple[Any, Any]]:
    """Each model's cross-validated AUC CI: DeLong on its training cohort's out-of-fold scores."""
    out: dict[str, tuple[Any, Any]] = {}
    for m in rows:
        scores = read_model_scores(store, m.model_id)
        for r in discrimination(scores):
            if r["cohort"] in scores.training_cohorts and r.get("ci_low") is not None:
                out[m.model_id] = (r["ci_low"], r["ci_high"])
    return out


def train_command(db: Path, cohort: str, aggregator: str, encoder: str, seed: int, folds: int,
                  params: dict[str, Any], encoder_training: str = "auto") -> str:
    words = ["cmil", "train", "--db", str(db), "--cohort", cohort,
             "--aggregator", aggregator, "--encoder", encoder, "--seed", str(seed),
             "--folds", str(folds)]
    if encoder_training != "auto":  # the command line's default
        words += ["--encoder-training", encoder_training]
    for key, value in params.items():
        words += ["--param", f"{key}={value}"]
    return " ".join(shlex.quote(w) for w in words)

st.title("Models")
show_flash()
editing = _common.viewer_notice()  # viewers: train, score and delete are disabled
db = _common.db_path()
runner = _common.job_runner()
models = _common.query("models", store_mod.list_models)
ids = models["model_id"].tolist()
rows = _common.query(
    "model_rows", lambda store: [r for i in store_mod.list_models(store)["model_id"]
                                 if (r := store_mod.get_model(store, i)) is not None]
)
scored = _common.query("model_score_counts", store_mod.model_score_counts)
cohorts = _common.query("cohorts", store_mod.list_cohorts)

if rows:
    marks = _common.stale_marks()
    intervals = _common.query("model_cv_ci", lambda store: cv_intervals(store, rows))
    table = model_table(rows, scored, marks, intervals)
    # Two tables that wrap (st.table): every column visible at 1280 px.
    st.table(table[WHAT_COLUMNS].set_index("Model"))
    st.table(table[HOW_COLUMNS].set_index("Model"))
    n_stale = int(marks["models"]["stale"].sum()) + int(marks["scores"]["stale"].sum())
    if n_stale:
        st.warning(
            "Stale: a model marked stale was trained on an older quality-control decision of "
            "its training cohort (train it again); scores marked stale were made on an older "
            "decision of their cohort (score it again). See the Quality control page.",
            icon=":material/history:")
    if marks["scores"]["tiling_mismatch"].notna().any():
        st.warning("Scores marked 'tiling differs' were made on a cohort whose patch size, "
                   "overlap or QC thresholds differ from the training cohort's.",
                   icon=":material/warning:")
    st.caption(
        "CV AUC: patient-stratified k-fold cross-validation on the training cohort "
        "(out-of-fold scores; the honest in-centre estimate), DeLong 95% CI. Cutoff: Youden "
        "on those out-of-fold scores, fixed then and applied unchanged to every cohort. "
        "Scored: patients scored per cohort. QC: the training cohort's quality-control "
        "decision the model was trained on. Every model's full configuration is its "
        "config.json, below."
    )
    with st.expander("Configuration (config.json) of a model"):
        chosen = st.selectbox("Model", ids, key="config_model")
        match = next((r for r in rows if r.model_id == chosen), None)
        if match is not None:
            st.caption(f"Files: {md(match.artifact_path)}")
            st.json(match.config, expanded=1)
else:
    st.info("No model trained yet: train one below.")

# ---------------------------------------------------------------------------
st.header("Train a model")
train_job = runner.get(TRAIN_JOB)
training_now = train_job is not None and train_job.running
if not cohorts:
    st.info("Import a cohort and ingest its slides first (Cohorts page).")
else:
    names = [c.cohort for c in cohorts]  # training cohorts come first
    roles = {c.cohort: c.role for c in cohorts}
    cohort = st.selectbox("Training cohort", names, key="train_cohort",
                          format_func=lambda c: f"{c} ({roles[c]})")
    aggregator = st.radio("Aggregator", list(AGGREGATOR_HELP), horizontal=True,
                          index=list(AGGREGATOR_HELP).index("attention"),  # the CLI's default
                          captions=list(AGGREGATOR_HELP.values()), key="train_aggregator")
    cols = st.columns(3)
    encoder = cols[0].selectbox("Patch encoder", ENCODERS, key="train_encoder",
                                help="smallcnn is fast on a CPU; ResNets use a seeded "
                                     "initialisation unless weights are given on the command line")
    seed = int(cols[1].number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1,
                                    key="train_seed"))
    folds = int(cols[2].number_input("Cross-validation folds", min_value=2, max_value=20,
                                     value=5, step=1, key="train_folds"))
    encoder_training = st.radio(
        "Patch CNN", list(CNN_TRAINING), horizontal=True, key="train_encoder_training",
        format_func=lambda k: CNN_TRAINING[k],
        help="finetune: the CNN itself is trained on the patches with each patient's label, "
             "inside every cross-validation fold (the study's method). frozen: the encoder is "
             "used as it is and only the aggregator learns (faster). auto: finetune, unless "
             "the smaller class has under 10 patients or 100 quality-passed patches (then "
             "frozen, and the model's record says so).")
    spec = mil.AGGREGATORS[aggregator].PARAMS
    params: dict[str, Any] = {}
    param_cols = st.columns(len(SHOWN_PARAMS[aggregator]))
    for col, key in zip(param_cols, SHOWN_PARAMS[aggregator]):
        default, kind, low, high = spec[key]
        if kind == "int":
            params[key] = int(col.number_input(display.parameter(key), min_value=int(low),
                                               max_value=int(high),
                                               value=int(default), step=1,
                                               key=f"train_{aggregator}_{key}"))
        else:
            params[key] = float(col.number_input(display.parameter(key), min_value=float(low),
                                                 max_value=float(high),
                                                 value=float(default), format="%g",
                                                 key=f"train_{aggregator}_{key}"))
    st.caption("Same on the command line:")
    st.code(train_command(db, cohort, aggregator, encoder, seed, folds, params, encoder_training),
            language="bash", wrap_lines=True)
    if st.button("Train", type="primary", disabled=training_now or not editing,
                 key="train_button") and _common.require_editor("train", cohort=cohort):
        train_audited = _common.audited_job(
            modeling.train, "train",
            lambda new_id, c=cohort, a=aggregator, e=encoder, s=seed, f=folds, p=dict(params),
            t=encoder_training: [
                (c, str(new_id), {"aggregator": a, "encoder": e, "seed": s, "folds": f,
                                  "params": p, "encoder_training": t})])
        runner.start(TRAIN_JOB, train_audited, str(db), cohort, aggregator=aggregator,
                     encoder=encoder, seed=seed, folds=folds, params=params,
                     encoder_training=encoder_training)
        st.session_state.setdefault(SEEN, {})[TRAIN_JOB] = "running"
    if training_now:
        st.caption("A model is being trained (progress below); one training runs at a time.")

# ---------------------------------------------------------------------------
st.header("Score cohorts")
if not ids:
    st.caption("Train a model first.")
else:
    picked = _common.selected_model()
    model_id = st.selectbox("Model", ids, index=ids.index(picked) if picked in ids else 0,
                            key="score_model")
    targets = st.multiselect("Cohorts", [c.cohort for c in cohorts],
                             default=[c.cohort for c in cohorts], key="score_cohorts")
    job = runner.get(score_job_name(model_id))
    busy = job is not None and job.running
    allow = st.checkbox(
        "Allow a tiling mismatch", value=False, key="score_allow_mismatch",
        help="Score cohorts whose patch size, overlap or quality-control thresholds differ "
             "from the training cohort's (refused otherwise). Their scores are marked "
             "'tiling differs' here, on the result pages and in the report.")
    cluster = st.text_input(
        "Ray cluster address (optional)", value=ray_address() or "", key="score_ray_address",
        placeholder="empty: on this server", help=(
            "host:port of a Ray cluster's head node (ray start --head): the feature files are "
            "then computed on the cluster (--executor ray; needs requirements-cluster.txt on "
            "this server and the nodes, and the slides on a filesystem every node reads). "
            "This server alone writes the store. Default: $CMIL_RAY_ADDRESS.")).strip()
    on_cluster = {"executor": "ray", "ray_address": cluster} if cluster else {}
    if st.button("Score", type="primary", disabled=busy or not targets or not editing,
                 key="score_button") and _common.require_editor("score", model_id=model_id):
        score_audited = _common.audited_job(
            modeling.score, "score",
            lambda done, m=model_id, a=allow: [
                (c, m, {"patients": int(n), "allow_tiling_mismatch": a})
                for c, n in done.items()])
        runner.start(score_job_name(model_id), score_audited, str(db), model_id, targets,
                     allow_tiling_mismatch=allow, **on_cluster)
        st.session_state.setdefault(SEEN, {})[score_job_name(model_id)] = "running"
    words = ["python", "-m", "cmil_core", "score", "--db", str(db), "--model", model_id]
    if set(targets) != {c.cohort for c in cohorts}:
        for name in targets:
            words += ["--cohort", name]
    if allow:
        words.append("--allow-tiling-mismatch")
    if cluster:
        words += ["--executor", "ray", "--ray-address", cluster]
    st.caption("Risk groups use the model's training cutoff. Rescoring replaces the model's "
               "earlier scores of those cohorts. Same on the command line:")
    st.code(" ".join(shlex.quote(w) for w in words), language="bash", wrap_lines=True)

# ---------------------------------------------------------------------------
def describe_done(job_name: str, result: object) -> None:
    if job_name == TRAIN_JOB:
        model = _common.query(f"model:{result}",
                              lambda store: store_mod.get_model(store, str(result)))
        if model is None:  # deleted since
            st.info(f"Trained model {md(result)} (since deleted).")
            return
        cv = model.metrics.get("cv_auc")
        st.success(
            f"Trained model {md(model.model_id)} on {md(model.train_cohorts)} "
            f"({model.metrics.get('n_train')} patients): cross-validated AUC "
            + ("—" if cv is None else f"{cv:.3f}")
            + f" over {model.metrics.get('cv_k')} folds; cutoff {display.cutoff(model.cutoff)}. "
            "Score cohorts with it below."
        )
        for warning in model.metrics.get("warnings") or []:
            st.warning(md(warning))
    else:
        done: dict[str, int] = result  # type: ignore[assignment]
        counts = ", ".join(f"{md(c)}: {n} patients" for c, n in done.items())
        st.success(f"Scored with {md(job_name.split(':', 1)[1])}: {counts}.")

def job_label(job: Job) -> str:
    return "Training" if job.name == TRAIN_JOB else f"Scoring with {md(job.name.split(':', 1)[1])}"

@st.fragment(run_every=1.0)
def watch_jobs() -> None:
    """Training and scoring jobs, live; reruns the page once when one ends."""
    names = [TRAIN_JOB] + [score_job_name(m) for m in ids]
    jobs = [j for n in names if (j := runner.get(n)) is not None]
    if not jobs:
        return
    st.header("Jobs")
    if _common.show_jobs(jobs, job_label, lambda job: describe_done(job.name, job.result), SEEN):
        st.rerun(scope="app")  # the model list and the sidebar show what was produced

watch_jobs()

# ---------------------------------------------------------------------------
st.header("Delete a model")
if ids:
    doomed = st.selectbox("Model to delete", ids, key="delete_model")
    n_scored = int(scored.loc[scored["model_id"] == doomed, "patients"].sum())
    folder = modeling.artifact_dir(db, doomed)
    st.caption(f"Removes the model, its {n_scored} patient scores and its files in "
               f"{md(folder)}.")
    typed = st.text_input("Type the model id to confirm", key="delete_model_confirm")
    job = runner.get(score_job_name(doomed))
    running = job is not None and job.running
    if running:
        st.warning(f"{md(doomed)} is scoring cohorts; wait for it to end before deleting it.")
    if st.button("Delete model", disabled=typed.strip() != doomed or running or not editing,
                 key="delete_model_button") and _common.require_editor("delete-model",
                                                                       model_id=doomed):
        try:
            modeling.delete_model(db, doomed)
        except (InputError, store_mod.StoreError) as exc:
            st.error(f"Nothing was deleted: {md(exc)}")
        else:
            _common.audit("delete-model", model_id=doomed,
                          details={"scores": n_scored, "folder": str(folder)})
            flash("success", f"Deleted model {md(doomed)}, its {n_scored} patient scores "
                             f"and its files in {md(folder)}.")
            st.rerun()
