"""The ``README.md`` that ``normref export`` writes into its directory: how a backend without
Python reads the golden vectors, what it computes, and what it writes back for ``normref judge``
(the format itself: conformance/golden.py)."""

from __future__ import annotations

from typing import Any

__all__ = ["readme_text"]

_BODY = """\
## Files

* `index.json`: the run (`seed`, `profile`, `ops`, `dtypes`, `layout`), your backend's
  declaration (`declaration`: per op the dtypes, conventions and options the cases were made for),
  and `cases`, one entry per case in order: `id`, `op`, `dtype`, `case`, `stem`, `run`, `steps`,
  `needs_result`.
* `cases.tsv`: the same entries, one tab-separated line each, after a header line:
  `id  op  dtype  case  stem  run  steps  needs_result`.
* Per case, with `stem` = `<op>/<dtype>/<case>`: `<stem>.json`, the manifest, and the arrays,
  `<stem>.npz` (layout `npz`: `numpy.load(path, allow_pickle=False)`) or the folder `<stem>/`
  holding one `.npy` file per array (layout `npy-dir`: `<stem>/step0/inputs/x.npy`), with the
  hyper-parameters of each step also in `<stem>/step<k>/hparams.tsv` (`name<TAB>JSON value`
  lines). A `.npy` file is a version-1.0 header (`\\x93NUMPY`, two version bytes, a little-endian
  uint16 header length, a Python-dict text with `descr` such as `'<f4'`, `fortran_order` (always
  False here) and `shape`), then the raw little-endian data in C order.

Array keys (inside the `.npz`, or paths under `<stem>/`) are `step<k>/<part>/<name>`:

| key | what |
|---|---|
| `step<k>/inputs/<name>` | an input of step k, in the case's dtype (labels, masks: int64, bool) |
| `step<k>/state/<name>` | the state the step starts from |
| `step<k>/cotangents/<name>` | the cotangent of output `<name>` (cases with gradients) |
| `step<k>/expected/<outputs\\|grads\\|state>/<name>` | the oracle's float64 values (debugging only) |
| `step<k>/bound/<outputs\\|grads\\|state>/<name>` | its float64 bound, free-running (debugging only) |
| `source/curvature/<p>`, `source/center/<p>` | the constants of a quadratic gradient source |

Optimizer names carry parameter paths: inputs `params/<path>` and `grads/<path>` (for example
`params/conv/weight`), state `<slot>/<path>` (per parameter, `exp_avg/conv/weight`) or `<slot>` (a
global slot, `step`).

The manifest (`<stem>.json`) says: `op`, `dtype`, `run` (below), `declared` (the dialect
knobs, `gradients`, `hparam_dtype`, `not_kept`, `state_dtype`, `takes_draws` the case was made
for), `state` (`"dict"`: the op has state, `"none"`: it has none), `cotangents` (whether
gradients are asked for), `memory_layout`, and `steps`, one record per step: `hparams` (every
hyper-parameter: the spec's defaults, the case's values and your declared conventions, floats
already rounded to `hparam_dtype`; for an optimizer `lr` is the rate of *this* step),
`given` (the arrays in the file for this step, with shape and dtype), and `return` (what to
write back, with shape and the dtype expected). `normref show <op>` prints an op's citation,
equations, inputs, outputs, state and the meaning of every hyper-parameter.

## Dtypes

* Every float array is stored in the case's dtype. bfloat16 has no NumPy dtype: its arrays are
  stored as **uint16 bit patterns** (the upper 16 bits of the float32 with the same value;
  `float32 value = bits << 16`); the manifest marks them `"stored_as": "uint16"`.
* Return every array in the case's dtype, or in a wider float dtype holding only values of it
  (float32 holding bfloat16 or float16 values is fine; float64 values that are not float32
  values in a float32 case FAIL by dtype). In a bfloat16 case a uint16 result array is read as
  bfloat16 bit patterns. State may come back in the declared `state_dtype`; exact counters (a step
  count, a batch counter: `"dtype": "any (an exact count)"` in `return`) in any dtype.
* Compute as your backend does (float32 accumulation for half types is what frameworks do and
  what the error model expects); the inputs are already rounded to the dtype, and so are the
  hyper-parameters to `hparam_dtype`.

## What to compute, by `run`

**`steps`** (normalizers and other functions; stateful ones run several steps, train -> eval
-> train through the `training` hyper-parameter): each step k is independent. Read
`step<k>/inputs/*`, `step<k>/state/*` (when `state` is `"dict"`) and `step<k>/cotangents/*` (when
`cotangents` is true) and `steps[k].hparams`; compute the outputs, the new state and, with
cotangents, the gradient of `sum over outputs of <cotangent, output>` with respect to every
differentiable input given (a VJP, with your backend's own backward pass). Write
`step<k>/outputs/<name>`, `step<k>/state/<name>` and `step<k>/grads/<name>`, as listed in
`steps[k].return`. Step k+1 starts from the state in its own file (the oracle's), not from yours.

**`trajectory`** (optimizers; stream ops such as estimators over batches): one run of `steps`
steps that you carry yourself, as a training loop does. Step 0 reads everything from the file.
At step k >= 1:

* the carried inputs are your own outputs of step k-1: `carried` maps each input to the result
  key it comes from (`params/<p>` <- `outputs/params/<p>`);
* the state is the state you returned at step k-1 (every slot you keep), with the slots given in
  `step<k>/state/` (the ones you declared `not_kept`, supplied by the harness) replacing yours;
* the other inputs are given in `step<k>/inputs/` (a fixed gradient sequence, a stream's batch),
  except when the manifest's `gradient_source` is not null: then `grads/<p>` of steps k >= 1 is a
  function of your parameters of that step, given by `gradient_source.formula` (and its
  constants in `source/...`): compute it in float64 from your parameters (widened exactly) and
  round it to nearest to the dtype, as the harness does;
* the hyper-parameters are `steps[k].hparams` (the lr follows a schedule: it changes per step).

Write every step's outputs and state (`step<k>/outputs/params/<p>`, `step<k>/state/<slot>/<p>`,
`step<k>/state/<slot>`; a stream op's `step<k>/outputs/<name>`). The judge compares each step
with the oracle's trajectory against a bound that accumulates the error carried from step to
step, and judges a step that leaves it again from your own parameters and state.

**`distributional`** (an op with random draws, for a backend that samples its own,
`takes_draws = false`): step 0's inputs lack the draws; call your sampler `samples` times on them
and write `sample<m>/outputs/<name>` for m = 0 .. samples-1. The means are judged against the
op's expectation (Hoeffding's bound; a correct sampler fails with probability <= 1e-6).

A case with `needs_result` 0 needs nothing: the harness decides it before any call (inputs that
overflow the dtype are MISTRUSTED; a convention the oracle rejects is SKIP).

## Writing results

Write the arrays of a case to `RESULTS/<stem>.npz` (`numpy.savez`, keys as above) or as
`RESULTS/<stem>/<key>.npy` files (`RESULTS/<stem>/step0/outputs/y.npy`). A case you cannot
compute: write `RESULTS/<stem>.json` with `{{"unsupported": "why", "step": k}}` (SKIP, like an
adapter raising `Unsupported`) or `{{"error": "message", "step": k}}` (ERROR). Optionally
`RESULTS/info.json`: `{{"framework": ..., "version": ..., "device": ...}}` for the reports.
A case with `needs_result` 1 and no result file is ERROR ("no result"); a quantity of
`return` that is absent is ERROR ("missing"), as for an adapter that does not return it.

Then judge:

```
normref judge {root} RESULTS [--json report.json] [--junit-xml report.xml] [--markdown report.md]
```

It runs `normref check`'s machinery with an adapter that answers each request from RESULTS (and
checks that the request is the exported one), so the verdicts, bounds, diagnoses (CONVENTION,
"consistent with float32 arithmetic", ...) and exit status (0 all judged cases pass, 1 FAIL /
ERROR / CONVENTION / XPASS, 2 usage error, 3 nothing compared) are those `normref check` gives a
Python adapter returning the same arrays. `step<k>/expected` and `step<k>/bound` are there to
debug: `|yours - expected| <= bound` is the free-running test of a step; the verdict is the
judge's.
"""


def readme_text(index: dict[str, Any], summary: Any) -> str:
    """The README of an export (``index``: its index.json; ``summary``: its ExportSummary)."""
    runs = ", ".join(f"{n} `{k}`" for k, n in sorted(summary.by_run.items()))
    head = [
        "# normref golden vectors",
        "",
        f"Exported by normref {index['normref_version']} for the backend `{index['adapter']}`: seed "
        f"{index['seed']}, profile `{index['profile']}`, ops `{index['ops'] or 'all'}`, dtypes "
        f"{', '.join(index['dtypes'])}; layout `{index['layout']}`. {summary.cases} cases ({runs}): "
        f"{summary.need_result} need a result, {summary.without_backend} are decided without one. Every "
        "case could be exported"
        + (f"; {summary.model_gradients} optimizer trajectories compute their gradients from the "
           "parameters (see `trajectory` below)." if summary.model_gradients else "."),
        "",
        "You read each case's inputs, compute with your backend, write the results to a folder "
        "RESULTS, and `normref judge` gives the verdicts `normref check` would give.",
        "" if index["expected_values"] else
        "\nThis export was made with `--no-expected`: it holds no `expected` or `bound` arrays.\n",
    ]
    return "\n".join(head) + "\n" + _BODY.format(root=index.get("root", "DIR"))
