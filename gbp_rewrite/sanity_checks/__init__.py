"""The sanity checks of Adebayo et al. 2018 ("Sanity Checks for Saliency Maps") for this tool's maps.

    result = gbp_rewrite.sanity("model.keras", "images/", out_dir="sanity_out")
    print(result.to_text())

`sanity_checks.randomize` re-initialises a Keras model's weights layer by layer from the output down (cascading
model parameter randomisation); `maps` rebuilds the explanation on each randomised model (the
Keras path: guided saliency, Grad-CAM, Guided Grad-CAM, and the plain gradient as the control);
`metrics` compares maps (Spearman rank correlation of |map| and of the signed map, SSIM);
`chart` draws the PNG; `run` ties them together and writes the table, JSON and chart.
"""
