"""parley.client"""
