# Reference values for tests/test_survival.py and tests/test_evaluation.py:
# a Cox model stratified by centre, R survival 3.5.3 (R 4.2, Debian bookworm).
#   Rscript tests/data/cox_strata.R
library(survival)
d <- read.csv("tests/data/cox_strata.csv")
fit <- coxph(Surv(time, status) ~ cmil_high + age_over_18 + stage4 + mycn_amp + strata(centre),
             data = d, ties = "efron")
s <- summary(fit)
options(digits = 12)
print(cbind(coef = s$coefficients[, "coef"], se = s$coefficients[, "se(coef)"],
            hr = s$conf.int[, "exp(coef)"], lower = s$conf.int[, "lower .95"],
            upper = s$conf.int[, "upper .95"], p = s$coefficients[, "Pr(>|z|)"]))
cat("concordance", s$concordance[["C"]], "n", fit$n, "events", fit$nevent, "\n")
