// Pins olareg (an OCI distribution-spec 1.1 registry) for scripts/setup.sh: the Go module proxy
// refuses the module's version list, so `go install ...@v0.1.2` fails; a consumer module builds it.
module oci-connector/tools/olareg

go 1.26.8

require (
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/olareg/olareg v0.1.2 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/spf13/cobra v1.8.1 // indirect
	github.com/spf13/pflag v1.0.6 // indirect
)
