"""parley.state"""
