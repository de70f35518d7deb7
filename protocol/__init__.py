"""parley.protocol"""
