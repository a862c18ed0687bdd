"""compress_ops' benchmarks and evidence, installed as ``compress_ops.perf`` (source: ``perf/``).

Run as modules (from any directory, from a checkout or an installed copy):

    python -m compress_ops bench [--quick] [--device cpu|cuda] [--dashboard] ...   # bench.py
    python -m compress_ops dashboard [--results-dir DIR] [--out-dir DIR]           # dashboard.py
    python -m compress_ops.perf.audit | .digits | .sqnr | .lowrank_energy
    python -m compress_ops.perf.bench_e2e --size tiny|small|1b ...              # bench_e2e.py

Modules: :mod:`.schema` (rows, results files, validation), :mod:`.machine` (where a run
happens), :mod:`.timing` (timers, measured peaks), :mod:`.family` (what the
``bench_<family>`` modules share), :mod:`.bench` (the suite), :mod:`.bench_e2e` (whole
models: Llama decode, MobileNetV2), :mod:`.dashboard`.
Results go to ``perf/results/`` of a source checkout, else to ``./perf-results/``
(:func:`compress_ops.perf.schema.default_results_dir`). The committed results and the
dashboard files stay in the repository; they are not part of the installed package.
"""
