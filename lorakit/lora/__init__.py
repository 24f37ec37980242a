"""lorakit.lora"""
