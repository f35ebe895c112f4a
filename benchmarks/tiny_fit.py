"""The smallest fit, where only fixed costs show: Lightning's ``BoringModel``, 8 training steps, as a whole process.

    python benchmarks/tiny_fit.py               # plain Lightning: one Trainer, 8 steps
    python benchmarks/tiny_fit.py --federated   # the same Trainer with FederatedStrategy(num_sites=2): 8 steps a site

``benchmarks/hospitals.py`` runs the pair side by side (arms ``tiny_lightning`` and ``tiny_lightning_fed``) and
prints the ratio of their walls: imports, Ray, the workers, the sites' set-up and teardown against Lightning's own.
Both fits validate once (Lightning's sanity check off), log nothing and write no checkpoint.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--federated", action="store_true")
    args = parser.parse_args()

    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    strategy = "auto"
    if args.federated:
        from lightning_fed import FederatedStrategy

        strategy = FederatedStrategy(num_sites=2, progress=False, checkpoint_every=0)
    trainer = L.Trainer(
        strategy=strategy,
        max_epochs=1,
        limit_train_batches=8,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    print(f"trained {trainer.global_step} steps")


if __name__ == "__main__":
    main()
