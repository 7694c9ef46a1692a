"""What each of the 2 ranks of a two-process test runs, given to `tests.helpers.run_ranks` (which joins and leaves the
gloo process group around it): work on torch's distributed API directly, without a Lightning trainer (FSDP1, which
Lightning builds only on GPUs)."""
