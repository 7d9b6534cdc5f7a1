"""Pipeline stage entry points, one module per `lors-bench` command (dvc.yaml calls them through the CLI).

Stages own the wiring the library stays free of: where inputs and outputs live (`lors.paths.Layout`),
the device, seeding, fingerprints and resumable checkpoints (`lors.checkpoints`), and tracking
(`lors.tracking`). Library modules (lors.data, lors.experts, lors.distill, lors.evaluation, baselines)
take tensors, settings and callbacks, and never log runs or pick paths under work_dir.
"""
