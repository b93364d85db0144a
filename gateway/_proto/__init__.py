"""Generated protocol stubs (python -m gateway.protogen). Do not edit by hand."""
