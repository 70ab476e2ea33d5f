"""braintrace's benchmark suite (a package so that its helper modules import as ``benchmarks._*``).

Run it explicitly: ``pytest benchmarks`` (tiny sizes, any machine) or ``pytest benchmarks --gpu``
(the real sizes on a CUDA GPU); see ``docs/performance.md``. Files:

* ``bench_dense.py``, ``bench_csr.py``, ``bench_lora.py``: each Pallas kernel against its XLA
  reference (cases in ``_ops.py``);
* ``bench_online.py``: one online-learning step end to end, BPTT, memory against T (models in
  ``_models.py``, per-process memory runs in ``_memory.py``);
* ``_timing.py``: the jitted timing loop and the roofline (shared with ``ci/gpu_kernel_smoke.py``);
* ``_config.py``: sizes of a run, iterations, the time budget.
"""
