// Marks the page once every embedded image has decoded (browser tests read data-images-loaded).
(function () {
  function check() {
    var images = Array.prototype.slice.call(document.images);
    var loaded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; });
    document.body.setAttribute("data-images-total", String(images.length));
    document.body.setAttribute("data-images-loaded", String(loaded.length));
    console.log("medvit report: " + loaded.length + "/" + images.length + " images rendered");
  }
  if (document.readyState === "complete") { check(); } else { window.addEventListener("load", check); }
})();
