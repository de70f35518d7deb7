"""parley.conformance"""
