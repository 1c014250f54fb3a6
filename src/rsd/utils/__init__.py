"""rsd.utils"""
