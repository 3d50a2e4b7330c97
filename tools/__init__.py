"""Scripts beside the packages (example projects, benchmarks, SLURM templates). A package only so
that tests can import the example-project generator: `from tools.make_example_project import main`."""
