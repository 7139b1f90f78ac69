"""The one seam to nnU-Net: models located and fingerprinted (model.py), nnU-Net behind
the stages' model seam (engine.py), preprocessing and prediction of a case (case.py,
predictor.py), training (planning.py, trainer.py) and imported v1 models (convert_v1.py).
Only this layer imports nnunetv2 (tests/test_layers.py)."""
