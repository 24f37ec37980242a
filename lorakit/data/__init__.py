"""lorakit.data"""
