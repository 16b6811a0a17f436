"""The HTTP layer: a Ray Serve application over the library's ``Recommender`` interface.

It imports ``rec_rllib``; the library never imports it.
"""
