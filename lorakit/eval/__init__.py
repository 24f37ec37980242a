"""lorakit.eval"""
