"""The explorer behind `diffusevae explore`: a local web page to play with z (Gradio is
imported only here).
"""
