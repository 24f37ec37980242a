"""lorakit.adapters"""
