package agentid

import (
	"errors"
	"fmt"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrorDomain is the google.rpc.ErrorInfo domain of every agentid error.
const ErrorDomain = "agentid"

// Error is a failed call: the gRPC status code plus the stable reason and metadata of the
// google.rpc.ErrorInfo that every agentid error carries (for example PERMISSION_DENIED,
// reason SCOPE_ESCALATION, metadata {"scopes": "billing.refund"}).
//
// Match it with errors.As. The server's messages never echo a token, key or secret.
type Error struct {
	Code     codes.Code
	Reason   string            // ErrorInfo reason, UPPER_SNAKE; empty when the status had none
	Message  string            // the status message, one human-readable line
	Metadata map[string]string // ErrorInfo metadata; nil when there is none

	status *status.Status
}

func (e *Error) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("agentid: %s: %s", e.Code, e.Message)
	}
	return fmt.Sprintf("agentid: %s %s: %s", e.Code, e.Reason, e.Message)
}

// GRPCStatus lets status.FromError and status.Code see the original status.
func (e *Error) GRPCStatus() *status.Status { return e.status }

// ReasonOf is the ErrorInfo reason of err when it is (or wraps) an *Error, else "".
func ReasonOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}

// wrapError turns a gRPC status error into an *Error; nil and non-status errors pass through.
func wrapError(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	e := &Error{Code: st.Code(), Message: st.Message(), status: st}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.GetDomain() == ErrorDomain {
			e.Reason = info.GetReason()
			e.Metadata = info.GetMetadata()
			break
		}
	}
	return e
}
