"""modeling/alb"""
