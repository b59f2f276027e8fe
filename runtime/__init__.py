"""The device runtime (edgepipe.runtime): numpy, OpenCV and one backend; never torch."""
import os

# OpenCV reads its image size cap once, when it loads: set here, before any runtime module imports cv2, an image
# whose header claims more pixels is refused unread (a 20000x20000 PNG would take seconds and 1.2 GB to decode,
# then be dropped for its size anyway: stream.MAX_SIDE). A value set in the environment wins.
MAX_IMAGE_PIXELS = 16384 * 16384
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
