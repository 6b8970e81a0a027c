"""Export a trained run for downstream fine-tuning: timm, Hugging Face transformers, the official layout.

    python -m pretrain.export --run RUN_DIR --out OUT_DIR [--format timm hf official]
                              [--headless] [--head-subset imagenet1k|FILE] [--tag stepNNNNNNNN]

`run.py` consolidates the checkpoint once into one fp32 state dict (any ZeRO stage,
pipeline stages, tensor shards) and builds the trained model from it; one writer per
format (`timm_format`, `hf_format`, `official_format`) writes its files and proves them
equal to the trained model in its own ecosystem; `card.py` writes the model card.
"""
