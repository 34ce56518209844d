"""The offline demo (``python -m imgfeat.demo``) and the generated sample images it and the tests use."""
