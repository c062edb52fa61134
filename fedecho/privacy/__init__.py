"""Site privacy: what a hospital keeps to itself.

De-identification of its DICOM cines (`fedecho.privacy.deid`: the PS3.15 Basic profile, salted
pseudonyms, blanking outside the ultrasound sector) happens before anything reaches the site's
registered data, so nothing downstream (training, federation, reports) ever sees an identifier.
"""
