"""rsd.data"""
