"""rsd.engine"""
