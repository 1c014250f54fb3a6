"""rsd.eval"""
