"""qlora-merge: dequantize a QLoRA base, merge the adapter exactly, GPTQ-requantize, and report the quality cost."""
