"""lorakit.examples"""
