"""rsd.envs"""
