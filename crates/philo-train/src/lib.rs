//! LoRA / QLoRA fine-tuning of Phi-3.
