"""lorakit.models"""
