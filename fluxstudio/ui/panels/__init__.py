"""One module per section of the page: render() builds it and returns its handles; wire() connects events."""
